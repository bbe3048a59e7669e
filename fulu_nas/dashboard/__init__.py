"""The study dashboard (``fulu-nas dashboard``: plotly panels on one self-contained page, logged to
MLflow) and ``fulu-nas ui`` (the MLflow UI of a search).

The dashboard's modules, each importing only those after it: ``command`` (the CLI), ``page`` (the
HTML), ``layout`` (which panels, checked against the registry), ``panels`` (the registry and one module
per group of panels), ``context`` (the study snapshot the panels read). Nothing is re-exported here:
the panels import optuna, which ``fulu-nas ui`` (``ui``) does not need.
"""

"""The study dashboard (``fulu-nas dashboard``: plotly panels on one self-contained page, logged to
MLflow) and ``fulu-nas ui`` (the MLflow UI of a search)."""

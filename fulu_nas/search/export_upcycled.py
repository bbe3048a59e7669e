"""``fulu-nas export`` of an upcycling search's trial (task ``upcycle``): the model card and the folder in the
``save_pretrained`` layout (:mod:`fulu_nas.interop.upcycle_export`). :mod:`.export_trial` records the export
in an MLflow run, as for a searched model (its metrics, :data:`RECORDED` files and the folder's fingerprint
as its tag ``fulu.fingerprint``; the folder itself is not registered as an MLflow model), and removes the
folder when that fails. The fingerprint is printed: the SHA-256 of ``checksums.json``
(:func:`fulu_nas.deploy.export.fingerprint`), which ``fulu_nas.load(..., expected_sha256=...)`` checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import optuna

from ..deploy.export import UPCYCLING, metric_rows
from ..deploy.routing_words import batching_note, routing_words
from .locate import StudyLocation
from .settings import SearchSettings
from .storage import mask_url

# The folder's files the export's MLflow run keeps (the folder itself is not an MLflow model).
RECORDED = (UPCYCLING, "README.md", "metrics.json")


def upcycled_card(s: SearchSettings, location: StudyLocation, trial: optuna.trial.FrozenTrial, arch: dict,
                  metrics: dict, reference: dict | None) -> str:
    moe = arch["moe"]
    if moe is None:
        what = "no layer upcycled (the dense reference itself), fine-tuned"
    else:
        shared = (f", plus a shared expert of {moe['shared_expert_ffn_size']} units cut out of the FFN"
                  if moe["num_shared_experts"] else "")
        what = (f"encoder layers {', '.join(map(str, arch['layers']))} upcycled into PiMoE layers that "
                f"{routing_words(moe)}, experts of {moe['expert_ffn_size']} units (router `{moe['router']}`{shared}), "
                f"then fine-tuned")
    rows = metric_rows(metrics)  # without the routing statistics of a model with no routing (NaN)
    versus = ""
    if reference is not None and reference["number"] != trial.number:
        versus = (f"\nThe dense reference (trial {reference['number']}) reached a validation MLM loss of "
                  f"{reference['loss']:.4g} with the search's fine-tuning budget ({s.train.steps} steps).\n")
    # A retrained export was fine-tuned again, for its own budget: the card says so, and how long.
    steps = metrics.get("retrain_steps", s.train.steps)
    retrained = f" (retrained for this export; the search's trials had {s.train.steps})" if metrics.get(
        "retrained") else ""
    title = "Upcycled" if moe is not None else "Dense"
    return f"""# {title} {arch['num_layers']}-layer encoder (trial {trial.number} of study {s.study.name})

The dense encoder `{s.task.model_path}` (SHA-256 `{arch['source_sha256'][:16]}...`) with {what}
with masked-language modelling for {steps} steps{retrained} (learning rate {arch['lr'] or s.train.lr:g}).
Found by fulu-nas: study `{s.study.name}` ({mask_url(location.storage_url)}), search space
`{s.space.name}`, selected by {metrics['selected_by']}. {batching_note(moe)}
{versus}
## Metrics (measured again on the exported weights, {metrics.get('device', 'cpu')})
| metric | value |
|---|---|
{rows}

## Use it
```python
import fulu_nas
from transformers import AutoTokenizer

model = fulu_nas.load(".", expected_sha256="FINGERPRINT")  # the transformers model with its PiMoE layers
tokenizer = AutoTokenizer.from_pretrained(".")   # when the search used the model's tokenizer
```
`FINGERPRINT` is the fingerprint `fulu-nas export` printed (the SHA-256 of `checksums.json`): with it every
file is checked against the exported ones before anything is read. `config.json` alone loads the dense model
without the experts: the PiMoE layers are rebuilt from `upcycling.yaml` by fulu-nas. This folder is not an
MLflow model: `fulu-nas serve` refuses it; serve the loaded model from Python (a transformers pipeline).
"""


def write_upcycled_export(location: StudyLocation, s: SearchSettings, study: optuna.Study,
                          trial: optuna.trial.FrozenTrial, model, config: dict, metrics: dict, out: Path,
                          before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` (the trial's :class:`~fulu_nas.interop.upcycle.UpcycledMLM`, measured into ``metrics``)
    to ``out``, with its model card. The caller records the export in the study's MLflow (:data:`RECORDED`;
    its run made by ``before_rename``, as :func:`~fulu_nas.deploy.export.assemble` takes it) and removes the
    folder if that fails."""
    from ..interop.upcycle_export import write_upcycled

    reference = next((t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                      if t.user_attrs.get("reference")), None)
    ref = {"number": reference.number, "loss": reference.user_attrs["metrics"]["loss"]} if reference else None
    arch = model.arch.to_dict()
    card = upcycled_card(s, location, trial, arch, metrics, ref)
    tokenizer = s.task.model_path if s.task.tokenizer_kind == "model" else None
    record = {key: config[key] for key in ("task", "source", "torch_version")}
    # The folder the encoder was read from, wherever the search was started: a relative path names no folder
    # for a reader elsewhere.
    record["task"] = {**record["task"], "model": s.task.model_path}
    return write_upcycled(out, model, tokenizer, record, metrics, card, before_rename)

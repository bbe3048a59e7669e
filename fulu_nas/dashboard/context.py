"""The study as the panels see it: one snapshot of its trials and settings, and the best trial's
MLflow artifacts."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

from ..search.objective import one_per_architecture

# The unit of a quantity whose name does not say it (latency_ms, peak_memory_mb do).
UNITS = {"throughput": "tokens/s"}


class Context:
    """A snapshot of the study (trials copied once, so a running study gives one consistent page),
    its search settings, and the best trial's artifacts (fetched lazily from MLflow)."""

    def __init__(self, study, settings, tracking_uri: str):
        import optuna

        self.study = study
        self.s = settings
        self.tracking_uri = tracking_uri
        self.objectives = list(settings.study.objectives)
        self.directions = list(settings.study.directions)
        self.multi = settings.study.multi_objective
        self.trials = study.get_trials(deepcopy=True)
        self.by_number = {t.number: t for t in self.trials}
        self.complete = [t for t in self.trials if t.state == optuna.trial.TrialState.COMPLETE]
        # trials still to finish: what the page may say is to come ("so far", "yet")
        self.pending = [t for t in self.trials
                        if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
        self.plot_study = self._plot_study(self.directions)
        self._objective_studies: dict[tuple[int, bool], Any] = {}
        self._pareto_plot_study = None
        self._artifacts: dict[str, Any] = {}
        self.best = self._best()

    def _plot_study(self, directions: list[str], objective: int | None = None, reused: bool = True,
                    infeasible: bool = True):
        """An in-memory copy for ``optuna.visualization``: its hover text shows the trial's
        architecture in a line instead of every user attribute (the full config, every metric).
        With ``objective``, a single-objective copy holding only that objective's values; without
        ``reused``, no trial that reused an identical architecture's result (the same point); without
        ``infeasible``, no complete trial over a study constraint."""
        import optuna

        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            plot = optuna.create_study(directions=directions, study_name=self.study.study_name)
            for t in self.trials:
                left_out = ((not reused and "cached_from" in t.user_attrs) or
                            (not infeasible and t.state == optuna.trial.TrialState.COMPLETE and not self.feasible(t)))
                if left_out:
                    # a failed placeholder, which no plot draws: the copy numbers its trials by their order,
                    # and a trial skipped outright shifted every later one's number (its hover text, its colour)
                    plot.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
                    continue
                t2 = copy.copy(t)
                attrs = {"architecture": describe_arch(t.user_attrs.get("arch"), t.params)}
                if t.user_attrs.get("reference"):
                    attrs["reference"] = True
                if "cached_from" in t.user_attrs:
                    attrs["reused_from_trial"] = t.user_attrs["cached_from"]
                t2.user_attrs = attrs
                if objective is not None and t.values is not None:
                    t2.values = [t.values[objective]]
                plot.add_trial(t2)
        finally:
            optuna.logging.set_verbosity(verbosity)
        return plot

    def objective_study(self, i: int, feasible_only: bool = False):
        """The plot study as a single-objective study of objective ``i``, with its direction.

        ``optuna.visualization`` takes an objective's direction from a single-objective study only:
        given a ``target`` (how a multi-objective study names one objective) it treats lower as
        better, so PED-ANOVA importances would rank the parameters for a *low* value of a maximised
        objective, and parallel coordinates would colour its worst trials darkest.

        ``feasible_only``: without the complete trials over a study constraint (the importances: what
        makes a good value among the trials that count)."""
        if not self.multi and not feasible_only:
            return self.plot_study
        key = (i, feasible_only)
        if key not in self._objective_studies:
            self._objective_studies[key] = self._plot_study(
                [self.directions[i]], objective=i if self.multi else None, infeasible=not feasible_only)
        return self._objective_studies[key]

    def quantity(self, name: str) -> str:
        """An objective's or metric's name with what it measures, for a column or an axis:
        ``throughput (tokens/s)``, ``metric (accuracy)`` (the task's own metric)."""
        if name == "metric" and getattr(self.s.task, "metric_name", None):
            return f"metric ({self.s.task.metric_name})"
        return f"{name} ({UNITS[name]})" if name in UNITS else name

    def feasible(self, t) -> bool:
        return all(c <= 0 for c in (t.constraints or {}).values())

    def ranked(self) -> list:
        """Complete trials, best first: feasible before infeasible; multi-objective studies put the
        Pareto front first (ordered by the first objective)."""
        front = {t.number for t in self.pareto()}

        def key(t):
            sign = 1 if self.directions[0] == "minimize" else -1
            return (not self.feasible(t), t.number not in front if self.multi else False, sign * t.values[0],
                    t.number)

        return sorted(self.complete, key=key)

    def pareto_plot_study(self):
        """The plot study without reused results: Optuna would draw each over its original."""
        if self._pareto_plot_study is None:
            self._pareto_plot_study = self._plot_study(self.directions, reused=False)
        return self._pareto_plot_study

    def pareto(self) -> list:
        """The Pareto front, one trial per architecture (as the search's summary counts it), ordered
        by the first objective."""
        if not self.multi or not self.complete:
            return []
        sign = 1 if self.directions[0] == "minimize" else -1
        front = one_per_architecture([self.by_number[t.number] for t in self.plot_study.best_trials])
        return sorted(front, key=lambda t: (sign * t.values[0], t.number))

    def _best(self):
        ranked = self.ranked()
        if not ranked or not self.feasible(ranked[0]):
            return None
        return self.by_number[ranked[0].number]

    def artifact(self, run_id: str, path: str):
        """A JSON artifact of an MLflow run, or an Exception saying why not."""
        key = f"{run_id}/{path}"
        if key not in self._artifacts:
            import os

            import mlflow

            from ..search.tracking import relocated_artifact_folder

            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
            client = mlflow.MlflowClient(self.tracking_uri)
            try:
                # A study folder moved since its search: its runs name the old artifact folder (an absolute
                # path); the files are in the moved folder.
                if moved := relocated_artifact_folder(client.get_run(run_id).info.artifact_uri, self.s.output_dir):
                    self._artifacts[key] = json.loads((moved / path).read_text())
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        local = client.download_artifacts(run_id, path, tmp)
                        self._artifacts[key] = json.loads(Path(local).read_text())
            except Exception as e:  # a missing artifact or an unreachable server: the panel says so
                self._artifacts[key] = e
        return self._artifacts[key]

    def best_artifact(self, path: str):
        """(the best trial's artifact, None) or (None, a note why there is none)."""
        if self.best is None:
            return None, "No complete feasible trial" + (" yet." if self.pending else ".")
        run_id = self.best.user_attrs.get("weights_run_id") or self.best.user_attrs.get("mlflow_run_id")
        if not run_id:
            return None, f"trial {self.best.number} has no MLflow run."
        data = self.artifact(run_id, path)
        if isinstance(data, Exception):
            return None, f"trial {self.best.number}: could not read {path} from MLflow run {run_id} ({data})."
        return data, None

    def best_label(self) -> str:
        t = self.best
        what = "first trial of the Pareto front" if self.multi else "best trial"
        extra = " (the reference architecture)" if t.user_attrs.get("reference") else ""
        reused = (f"; reuses the weights of trial {t.user_attrs['cached_from']}" if "cached_from" in t.user_attrs
                  else "")
        return f"{what}: trial {t.number}{extra}: {describe_arch(t.user_attrs.get('arch'), t.params)}{reused}"


def describe_arch(arch: dict | None, params: dict) -> str:
    """One line: the MoE layer's shape and routing (from the trial's ArchConfig; for an upcycled encoder,
    which of its layers became MoE layers), else its parameters."""
    if isinstance(arch, dict) and arch.get("family") == "upcycle" and not arch.get("layers"):
        return f"the dense model ({arch.get('num_layers')} layers, none upcycled)"
    if not isinstance(arch, dict) or not isinstance(arch.get("moe"), dict):
        return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
    m = arch["moe"]
    parts = [f"{m.get('router')} router", f"{m.get('num_experts')} experts"]
    if m.get("top_p") is not None:
        parts.append(f"top-p {m['top_p']}")
    elif m.get("capacity_factor") is not None:
        parts.append(f"capacity {m['capacity_factor']}")
    else:
        parts.append(f"top-{m.get('top_k')}")
    parts.append(f"expert ffn {m.get('expert_ffn_size')}")
    if (m.get("hierarchy_depth") or 1) > 1:
        parts.append(f"hierarchy depth {m['hierarchy_depth']}")
    if m.get("num_shared_experts"):
        parts.append(f"{m['num_shared_experts']} shared")
    if m.get("aux_loss_coef"):
        parts.append(f"aux loss {m['aux_loss_coef']:g}")
    if m.get("bias_update_rate"):
        parts.append("aux-free balancing")
    n = arch.get("num_layers")
    layers = f"{n} layer{'' if n == 1 else 's'} x {arch.get('hidden_size')} hidden"
    if arch.get("family") == "upcycle":
        layers += f", layer{'' if len(arch['layers']) == 1 else 's'} {', '.join(map(str, arch['layers']))} upcycled"
    return f"{layers}; " + ", ".join(parts)

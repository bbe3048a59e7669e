"""The dashboard's panels: a registry of name -> how to draw it, its default title and the options a
layout may give it. A panel is ``draw(ctx, options) -> blocks`` (plotly figures or HTML notes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .confirmation import panel_confirmation
from .history import panel_history, panel_objective, panel_pareto_front
from .importances import panel_importances
from .parallel import panel_parallel
from .top_trials import panel_top_trials
from .training import panel_expert_load, panel_routing_matrix, panel_training_curves


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@dataclass(frozen=True)
class PanelSpec:
    draw: Any
    title: str
    options: dict = field(default_factory=dict)
    option_help: dict = field(default_factory=dict)


PANELS: dict[str, PanelSpec] = {
    "objective": PanelSpec(panel_objective, "Objective"),
    "pareto_front": PanelSpec(panel_pareto_front, "Pareto front"),
    "history": PanelSpec(panel_history, "Optimization history"),
    "importances": PanelSpec(panel_importances, "Parameter importances"),
    "parallel": PanelSpec(panel_parallel, "Parameters against the objective"),
    "training_curves": PanelSpec(panel_training_curves, "Training curves"),
    "expert_load": PanelSpec(panel_expert_load, "Expert load over training (best trial)"),
    "routing_matrix": PanelSpec(panel_routing_matrix, "Domain x expert routing (best trial)"),
    "confirmation": PanelSpec(panel_confirmation, "Confirmation: search rank vs confirmed rank"),
    "top_trials": PanelSpec(panel_top_trials, "Top trials", {"rows": _positive_int},
                            {"rows": "a positive integer"}),
}

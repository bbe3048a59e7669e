"""Samplers replayed against a table (NAS-Bench style): many repetitions of a search in seconds.

For a sampler and a repetition r, an in-memory Optuna study with the product's sampler for
``study.sampler=NAME`` (:func:`fulu_nas.search.study.make_sampler` on the composed study settings,
seed r) samples the space through the product's :meth:`~fulu_nas.search.space.SearchSpace.sample`;
the objective looks the architecture up in the table instead of training it. A query returns the
architecture's mean over the table's seeds: the regret against the table's best mean is then never
negative (one seed's value can undercut the best mean), and the replay measures the sampler, not the
luck of a seed. Trials count as a study counts them: a repeated architecture is a trial (a real
study reuses the earlier result but counts it toward ``n_trials``); an infeasible sample (a broken
constraint, an impossible architecture) is not.

The score of a repetition after t trials is its regret: one objective, the gap between its best
value so far and the table's best mean; several, ``1 - HV_t / HV_table``, the share of the table's
hypervolume (its whole Pareto front's, at a fixed reference point) that the trials so far miss.
Hypervolumes come from Optuna's public ``optuna.visualization.plot_hypervolume_history``; it sums
incrementally, so one front reached in another order differs in the last bits: the regret is rounded
to :data:`HV_REGRET_DECIMALS` places, so that one front is one regret (which reaches a target or not).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import optuna

from ..errors import FuluConfigError
from ..search.settings import SearchSettings
from ..search.study import make_sampler, quiet_optuna
from .finite_space import architecture_keys, cells
from .nas_settings import product_settings
from .nas_table_file import NasTable, check_origin, read_table

# Table columns a replay can optimise, with the product's directions (fulu_nas.search.settings.OBJECTIVES).
OBJECTIVES = ("loss", "metric", "routing_accuracy", "load_balance", "active_params", "total_params")
# The hypervolume reference point sits this share of each objective's range beyond the table's worst value.
REFERENCE_MARGIN = 0.1
# Far above the rounding of the incremental sums (about 1e-16), far below a regret worth reading.
HV_REGRET_DECIMALS = 12


def build_sampler(s: SearchSettings, name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "qmc":
        # Not a product sampler. Scrambled: unscrambled Sobol points ignore the seed, so every repetition
        # would replay one sequence. It places the first trial's parameters (a categorical as one
        # coordinate in [0, choices)); a parameter outside that trial's space (a `when` it did not
        # meet) comes from its independent sampler, RandomSampler(seed).
        return optuna.samplers.QMCSampler(scramble=True, seed=seed)
    return make_sampler(replace(s, study=replace(s.study, sampler=name, seed=seed)))


def hypervolume_history(study: optuna.Study, reference_point: tuple[float, ...]) -> list[float]:
    """The hypervolume after each completed trial (Optuna's public helper draws it; we read its points)."""
    figure = optuna.visualization.plot_hypervolume_history(study, list(reference_point))
    return [float(v) for v in figure.data[0].y]


@dataclass(frozen=True)
class Replay:
    """A table and the objectives optimised against it: what every repetition needs."""

    settings: SearchSettings
    table: NasTable
    objectives: tuple[str, ...]
    lookup: dict[tuple[str, ...], tuple[float, ...]]  # architecture cells -> objective means over seeds
    best: float | None  # one objective: the table's best mean
    reference_point: tuple[float, ...] | None  # several: the hypervolume reference, in the objectives' units
    table_hypervolume: float | None

    @property
    def directions(self) -> tuple[str, ...]:
        return self.settings.study.directions

    def study(self, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
        return optuna.create_study(directions=list(self.directions), sampler=sampler)

    def run(self, sampler: str, seed: int, trials: int) -> list[float]:
        """One repetition: the regret after each of ``trials`` counted trials."""
        space = self.settings.space

        def objective(trial: optuna.Trial):
            values = self.lookup.get(cells(space, space.sample(trial)))
            if values is None:  # the table holds every feasible architecture
                raise optuna.TrialPruned("infeasible: not trained, not counted")
            return values[0] if len(values) == 1 else values

        with quiet_optuna():
            study = self.study(build_sampler(self.settings, sampler, seed))
            complete = (optuna.trial.TrialState.COMPLETE,)
            # The product's own cap on attempts per requested trial (fulu_nas.search.study.run_worker).
            study.optimize(objective, n_trials=10 * trials + 50,
                           callbacks=[optuna.study.MaxTrialsCallback(trials, states=complete)])
            done = study.get_trials(deepcopy=False, states=complete)
            if len(done) < trials:
                raise FuluConfigError(f"{sampler}: {trials} trials requested, only {len(done)} feasible samples in "
                                      f"{10 * trials + 50} attempts")
            if self.best is None:
                return [max(0.0, round(1 - hv / self.table_hypervolume, HV_REGRET_DECIMALS))
                        for hv in hypervolume_history(study, self.reference_point)]
            sign = 1 if self.directions[0] == "minimize" else -1
            regret, best = [], float("inf")
            for t in done:
                best = min(best, sign * t.values[0])
                regret.append(best - sign * self.best)
            return regret


def load_replay(space: str, task: str, table_path: str, objectives: tuple[str, ...]) -> Replay:
    """The replay of ``objectives`` against the table (checked against the space); cached per process
    while the file is unchanged (a table rewritten between two calls was replayed as first read)."""
    try:
        stat = os.stat(table_path)
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except OSError:  # read_table names the problem
        stamp = None
    return _load_replay(space, task, table_path, objectives, stamp)


@functools.cache
def _load_replay(space: str, task: str, table_path: str, objectives: tuple[str, ...], _stamp) -> Replay:
    unknown = [o for o in objectives if o not in OBJECTIVES]
    if unknown or not objectives or len(set(objectives)) < len(objectives):
        raise FuluConfigError(f"--objectives: choose distinct ones of {', '.join(OBJECTIVES)}, got "
                              f"{' '.join(objectives) or 'none'}")
    check_origin(table_path, space, task)
    s = product_settings(space, task, (f"study.objectives=[{','.join(objectives)}]", "study.pruner=none"))
    table = read_table(table_path, s.space, architecture_keys(s.space, s.task), s.task)
    means = table.means(1)
    lookup = {key: tuple(m[o] for o in objectives) for key, m in means.items()}
    signs = [1 if d == "minimize" else -1 for d in s.study.directions]
    if len(objectives) == 1:
        best = signs[0] * min(signs[0] * v[0] for v in lookup.values())
        return Replay(s, table, objectives, lookup, best, None, None)
    reference = []
    for i, sign in enumerate(signs):
        worst, top = max(sign * v[i] for v in lookup.values()), min(sign * v[i] for v in lookup.values())
        if worst == top:  # the reference point would sit on every value: the table's hypervolume is 0
            raise FuluConfigError(f"--objectives: {objectives[i]} is {sign * worst:g} for every architecture of "
                                  f"{table_path}: nothing to trade it against, so no hypervolume regret; "
                                  f"leave it out")
        reference.append(sign * (worst + REFERENCE_MARGIN * (worst - top)))
    replay = Replay(s, table, objectives, lookup, None, tuple(reference), None)
    with quiet_optuna():
        whole = replay.study(optuna.samplers.RandomSampler(seed=0))
        whole.add_trials([optuna.trial.create_trial(values=list(v)) for v in lookup.values()])
        return replace(replay, table_hypervolume=hypervolume_history(whole, replay.reference_point)[-1])

"""Trial budgets in work (training steps), not wall-clock time: the same study gives the same values
on an idle and on a loaded machine; the time limit is only a safety cap that fails a trial."""

from __future__ import annotations

import os
import signal

import optuna
import pytest

from fulu_nas.bench.cost_stability import busy_processes

from .test_search_e2e import load_study, run_search

pytestmark = pytest.mark.slow
TrialState = optuna.trial.TrialState


def _trial_outcomes(out) -> list[tuple]:
    return [(t.number, t.state, t.params, t.values, t.user_attrs.get("pruned_at_step"),
             t.user_attrs.get("metrics", {}).get("train_steps")) for t in load_study(out).trials]


def test_identical_trial_values_with_and_without_competing_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ("study.n_trials=5", "study.startup_trials=2")
    assert run_search(tmp_path / "idle", *common) == 0
    hogs = busy_processes(2)  # stopped by this test, and with its process whatever ends it
    try:
        assert run_search(tmp_path / "loaded", *common) == 0
    finally:
        for p in hogs:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    idle, loaded = _trial_outcomes(tmp_path / "idle"), _trial_outcomes(tmp_path / "loaded")
    assert sum(o[1] == TrialState.COMPLETE for o in idle) >= 2
    assert all(o[5] in (None, 60.0) for o in idle)  # every completed trial trained the whole budget
    assert loaded == idle


def test_a_trial_past_the_safety_cap_fails_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    # its only trial failed: the study has no result (exit code 1)
    assert run_search(out, "study.n_trials=1", "trainer.steps=100000", "trainer.max_seconds=1") == 1
    (trial,) = load_study(out).trials
    assert trial.state == TrialState.FAIL
    assert trial.user_attrs["fail_reason"].startswith("budget cap (trainer.max_seconds): safety cap of 1 s reached")


def test_hyperband_over_steps_gives_promising_trials_the_whole_budget(tmp_path, monkeypatch):
    """study.pruner=hyperband: rungs at 10, 30 and 90 of 90 steps (reduction factor 3). A trial stops
    early only at a rung where a better trial went on; the trials that go on train all 90 steps."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.pruner=hyperband", "study.n_trials=12", "trainer.steps=90",
                      "trainer.report_every=10") == 0
    trials = [t for t in load_study(out).trials if "cached_from" not in t.user_attrs]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and len(complete) >= 2
    assert all(t.user_attrs["metrics"]["train_steps"] == 90 for t in complete)
    for t in pruned:
        step = t.user_attrs["pruned_at_step"]
        assert step in (10, 30) and max(t.intermediate_values) == step
        better = [u for u in trials if u is not t and u.intermediate_values.get(step, float("inf"))
                  < t.intermediate_values[step] and max(u.intermediate_values) > step]
        assert better, f"trial {t.number} was stopped at step {step} though no better trial went on"

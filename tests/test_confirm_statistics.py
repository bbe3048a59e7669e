"""What a confirmation concludes from its runs, on crafted inputs (no training): its seeds are not the
search's own, Kendall's tau counts tied means as ties, no winner is named while runs failed, a
reference without results is said to have none, and an objective that is the same on every seed is
compared exactly."""

from __future__ import annotations

import contextlib
import io

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from scipy.stats import kendalltau

from fulu_nas.search.app import compose_config
from fulu_nas.search.confirm import Confirmation, plan_confirmation, result_key, run_tags
from fulu_nas.search.confirm_summary import print_confirmation, summarize_confirmation, winner
from fulu_nas.search.settings import SEED_MAX, ConfirmSettings, load_settings

TrialState = optuna.trial.TrialState


# ---------------------------------------------------------------- crafted inputs


def tiny_settings(tmp_path, *overrides):
    cfg, _ = compose_config(["+experiment=tiny", f"hydra.run.dir={tmp_path}", *overrides])
    return load_settings(cfg, tmp_path, will_train=False)


def crafted_study(s, losses: list[float]) -> optuna.Study:
    """Trial i has loss ``losses[i]`` and its own architecture (hash ``h<i>``); trial 0 is the reference.
    Every trial holds the space's reference architecture, which rebuilds."""
    arch = s.space.arch(s.space.with_derived(dict(s.space.reference)), s.task).to_dict()
    study = optuna.create_study(directions=list(s.study.directions))
    for i, loss in enumerate(losses):
        study.add_trial(optuna.trial.create_trial(
            values=[loss], params={"h": f"h{i}"}, distributions={"h": CategoricalDistribution([f"h{i}"])},
            user_attrs={"arch": arch, "arch_hash": f"h{i}", "reference": i == 0, "metrics": {"loss": loss}}))
    return study


def row(trial: int, search_rank: int | None, values: list[list[float]], reference=False, feasible=True) -> dict:
    """An architecture's row as the confirmation builds it: ``values`` holds one list of objective values
    per seed that succeeded (a failed seed has no run)."""
    return {"trial": trial, "arch_hash": f"h{trial}", "search_rank": search_rank, "reference": reference,
            "feasible": feasible, "search_values": [0.0] * len(values[0] if values else [0]), "params": "",
            "runs": [{"seed": i + 1, "values": v, "mlflow_run_id": None} for i, v in enumerate(values)]}


def header(objectives: list[str], failed=(), seeds=(1, 2, 3)) -> dict:
    return {"study": "s", "objectives": objectives, "directions": ["minimize"] * len(objectives), "top_k": 8,
            "ranked_architectures": 9, "budget_factor": 4, "search_steps": 300, "steps": 1200,
            "seeds": list(seeds), "failed_runs": list(failed), "complete": True, "missing_runs": []}


def printed(summary: dict, tmp_path) -> str:
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print_confirmation(summary, tmp_path / "confirmation.json")
    return " ".join(text.getvalue().split())  # the table wraps its cells


# ---------------------------------------------------------------- the seeds


@pytest.mark.parametrize("search_seed,seeds,expected", [
    (0, 3, (1, 2, 3)),
    (7, 1, (8,)),
    (SEED_MAX, 2, (0, 1)),  # counted on from 0 past the largest seed: still fresh, still seeds
    (SEED_MAX - 1, 3, (SEED_MAX, 0, 1)),
])
def test_a_confirmation_never_trains_the_seed_the_search_selected_on(tmp_path, search_seed, seeds, expected):
    """The search ranks its trials by their runs of trainer.seed; a confirmation whose first seed was that
    seed counted the very draw the architectures were selected on as one of its independent samples (at
    budget_factor=1, a bit-identical copy of the trial), biasing tau and the tests toward the search."""
    s = tiny_settings(tmp_path, f"trainer.seed={search_seed}")
    plan = plan_confirmation(crafted_study(s, [1.3, 1.2, 1.1]), s, ConfirmSettings(top_k=2, seeds=seeds))
    assert plan.seeds == expected
    assert search_seed not in plan.seeds and all(0 <= seed <= SEED_MAX for seed in plan.seeds)
    assert {seed for _, seed in plan.runs()} == set(expected)


def test_results_of_the_searchs_own_seed_are_not_counted_as_a_confirmation_seed(tmp_path):
    """Results recorded by a confirmation that trained the search's seed (seeds 0 and 1 of trainer.seed=0)
    are read by seed: seed 1's is reused (the same run), seed 0's is never one of seeds 1 and 2."""
    s = tiny_settings(tmp_path)
    study = crafted_study(s, [1.3, 1.2])
    plan = plan_confirmation(study, s, ConfirmSettings(top_k=1, seeds=2, budget_factor=4))
    assert plan.seeds == (1, 2)
    for c in plan.candidates:
        for seed in (0, 1):  # what the earlier numbering of the seeds recorded
            study.set_user_attr(result_key(c.arch_hash, seed, plan.steps), {
                "trial": c.trial.number, "arch_hash": c.arch_hash, "seed": seed, "steps": plan.steps,
                "values": [1.0 + seed], "metrics": {}, "mlflow_run_id": f"run-{c.arch_hash}-{seed}"})
    confirmation = Confirmation.__new__(Confirmation)  # no MLflow needed to read what is recorded
    confirmation.study, confirmation.s, confirmation.plan = study, s, plan
    recorded = confirmation.recorded()
    assert sorted(v["seed"] for v in recorded.values()) == [1] * len(plan.candidates)
    assert sorted((c.arch_hash, seed) for c, seed in confirmation.todo()) == sorted(
        (c.arch_hash, 2) for c in plan.candidates)


def test_a_reference_outside_the_searchs_ranking_has_no_search_rank_tag(tmp_path):
    """The reference missed the study's constraint, so it has no search rank: its runs were tagged
    fulu.search_rank "None" (the text), which reads like a value."""
    s = tiny_settings(tmp_path)
    study = crafted_study(s, [1.3, 1.2, 1.1])
    reference = study.trials[0]
    infeasible = optuna.trial.create_trial(values=reference.values, params=reference.params,
                                           distributions=reference.distributions, user_attrs=reference.user_attrs,
                                           system_attrs={"constraints": [1.0]})
    study = optuna.create_study(directions=list(s.study.directions))
    study.add_trials([infeasible, *crafted_study(s, [1.3, 1.2, 1.1]).trials[1:]])
    plan = plan_confirmation(study, s, ConfirmSettings(top_k=2, seeds=1, budget_factor=2))
    tags = {c.trial.number: run_tags(c, plan.options.budget_factor) for c in plan.candidates}
    assert tags[0] == {"fulu.arch_hash": "h0", "fulu.reference": True, "fulu.budget_factor": 2}
    assert tags[2]["fulu.search_rank"] == 1 and tags[1]["fulu.search_rank"] == 2


# ---------------------------------------------------------------- Kendall's tau with ties


def test_tau_is_undefined_when_every_confirmed_mean_is_the_same(tmp_path):
    """Five architectures with the same accuracy on every seed (a saturated metric): the confirmed rank
    broke the ties by the search rank and tau read +1.00 (p=0.0167), agreement the confirmation never saw."""
    same = [[0.5]] * 3
    rows = [row(5, 1, same), row(3, 2, same), row(8, 3, same), row(1, 4, same), row(0, 5, same, reference=True)]
    summary = summarize_confirmation(header(["loss"]), rows, ["minimize"])
    tau = summary["kendall_tau"]
    assert tau["tau"] is None and tau["p_value"] is None and tau["n"] == 5
    assert tau["note"].startswith("undefined: the 5 architectures have the same confirmed mean")
    assert [r["confirmed_rank"] for r in summary["architectures"]] == [1] * 5  # a tie shares its place
    text = printed(summary, tmp_path)
    assert "Kendall's tau (search rank vs confirmed rank): undefined: the 5 architectures have the same" in text
    assert "+1.00" not in text


@pytest.mark.parametrize("direction,sign", [("minimize", 1), ("maximize", -1)])
def test_tau_counts_tied_means_as_ties(direction, sign):
    """Search ranks 1-4, confirmed means 1.0, 1.0, 0.9, 1.1 (to minimise): tau-b is +0.183 (p=0.72); the
    tie broken by the search rank gave +0.333."""
    means = [1.0, 1.0, 0.9, 1.1]
    rows = [row(i, i, [[sign * m]] * 3) for i, m in enumerate(means, start=1)]
    summary = summarize_confirmation({**header(["loss"]), "directions": [direction]}, rows, [direction])
    expected = kendalltau([1, 2, 3, 4], means)
    assert summary["kendall_tau"]["tau"] == pytest.approx(expected.statistic) == pytest.approx(0.1826, abs=1e-4)
    assert summary["kendall_tau"]["p_value"] == pytest.approx(expected.pvalue)
    ranks = {r["trial"]: r["confirmed_rank"] for r in summary["architectures"]}
    assert ranks == {3: 1, 1: 2, 2: 2, 4: 4}
    # Tau over the shared ranks is the same number: the table's two rank columns tell it.
    assert kendalltau([1, 2, 3, 4], [ranks[t] for t in (1, 2, 3, 4)]).statistic == pytest.approx(expected.statistic)


# ---------------------------------------------------------------- failed runs


FAILED_7 = [{"trial": 7, "seed": 1, "reason": "budget cap (trainer.max_seconds): 412 s"},
            {"trial": 7, "seed": 2, "reason": "out of memory: CUDA out of memory"}]
DIVERGED_7 = [{"trial": 7, "seed": 1, "reason": "diverged: training diverged at step 410: loss nan (not finite)",
               "diverged": True},
              {"trial": 7, "seed": 2, "reason": "diverged: training diverged at step 388: loss nan (not finite)",
               "diverged": True}]


def test_no_winner_while_runs_of_an_architecture_failed(tmp_path):
    """Trial 7 failed on two of its three seeds (the safety cap, memory: the next invocation retries
    them) and was crowned the winner (which export trial=best took) on the mean of its surviving seed."""
    rows = [row(7, 1, [[0.931]]), row(4, 2, [[0.947], [0.951], [0.944]]),
            row(0, 3, [[0.962], [0.958], [0.965]], reference=True)]
    summary = summarize_confirmation(header(["loss"], FAILED_7), rows, ["minimize"])
    assert summary["winner"] is None and winner(summary) is None
    assert summary["winner_withheld"].startswith("runs failed: trial 7 seed(s) 1, 2")
    by_trial = {r["trial"]: r for r in summary["architectures"]}
    assert by_trial[7]["failed_seeds"] == [1, 2] and by_trial[4]["failed_seeds"] == []
    text = printed(summary, tmp_path)
    assert "no winner: runs failed: trial 7 seed(s) 1, 2" in text and "winner: the confirmed winner" not in text
    for f in FAILED_7:
        assert f"failed: trial 7 seed {f['seed']}: {f['reason']}" in text
    assert "(1 seed(s); 2 failed)" in text

    # The same runs, all succeeded: the winner is named.
    rows[0] = row(7, 1, [[0.931], [0.940], [0.935]])
    summary = summarize_confirmation(header(["loss"]), rows, ["minimize"])
    assert summary["winner"]["trial"] == 7 and summary["winner_withheld"] is None


def test_no_winner_and_the_reason_when_every_run_of_the_possible_winners_failed(tmp_path):
    """Every run of trial 7 and of the reference hit the safety cap: no architecture had a result, and the
    summary had no winner without a word why (winner_withheld empty, no "no winner:" line, export saying only
    that the confirmation named none)."""
    from fulu_nas.search.confirm_summary import why_no_winner

    failed = [{"trial": t, "seed": s, "reason": "budget cap (trainer.max_seconds): 412 s"} for t in (7, 0)
              for s in (1, 2)]
    rows = [row(7, 1, []), row(0, 2, [], reference=True)]
    summary = summarize_confirmation(header(["loss"], failed, seeds=(1, 2)), rows, ["minimize"])
    assert summary["winner"] is None
    assert summary["winner_withheld"].startswith("runs failed: trial 7 seed(s) 1, 2; trial 0 seed(s) 1, 2")
    assert why_no_winner(summary) == f"its confirmation named no winner: {summary['winner_withheld']}"
    text = printed(summary, tmp_path)
    assert "no winner: runs failed: trial 7 seed(s) 1, 2; trial 0 seed(s) 1, 2" in text
    assert "run the command again to retry the failed runs" in text


def test_an_architecture_that_diverged_on_a_seed_cannot_win(tmp_path):
    """Training is seeded, so a divergence repeats itself: it rules its architecture out (it would win on
    its surviving seed) instead of withholding the winner for ever."""
    rows = [row(7, 1, [[0.931]]), row(4, 2, [[0.947], [0.951], [0.944]]),
            row(0, 3, [[0.962], [0.958], [0.965]], reference=True)]
    summary = summarize_confirmation(header(["loss"], DIVERGED_7), rows, ["minimize"])
    assert summary["winner"]["trial"] == 4 and summary["winner_withheld"] is None
    by_trial = {r["trial"]: r for r in summary["architectures"]}
    assert by_trial[7]["diverged_seeds"] == [1, 2] and by_trial[7]["failed_seeds"] == []
    assert by_trial[7]["confirmed_rank"] == 1  # its surviving seed still ranks, for the table
    text = printed(summary, tmp_path)
    assert "(1 seed(s); 2 diverged)" in text and "winner: the confirmed winner, trial 4" in text
    assert ("diverged: trial 7 seed 1: diverged: training diverged at step 410: loss nan (not finite) (training "
            "is seeded: not trained again; the architecture cannot be the winner)") in text

    # A divergence beside another failure of the same architecture: it cannot win, so nothing is withheld.
    summary = summarize_confirmation(header(["loss"], [*DIVERGED_7[:1], FAILED_7[1]]), rows, ["minimize"])
    assert summary["winner"]["trial"] == 4

    # Every architecture that met the constraints diverged somewhere: no winner, and no retry is offered.
    everyone = [*DIVERGED_7, {"trial": 4, "seed": 3, "reason": "diverged", "diverged": True},
                {"trial": 0, "seed": 1, "reason": "diverged", "diverged": True}]
    summary = summarize_confirmation(header(["loss"], everyone), rows, ["minimize"])
    assert summary["winner"] is None
    assert summary["winner_withheld"] == ("every architecture that met the constraints diverged on a seed: trial 7 "
                                          "seed(s) 1, 2; trial 4 seed(s) 3; trial 0 seed(s) 1")
    text = printed(summary, tmp_path)
    assert "no winner: every architecture" in text and "retry" not in text


def test_a_winner_below_an_infeasible_or_diverged_architecture_is_not_called_the_best(tmp_path):
    """The reference over the study's constraints ranked first (0.7437 against 0.713, maximised), and the
    winner line said trial 1 had the best mean; nothing said the reference was left out, nor why."""
    rows = [row(0, None, [[0.72], [0.76]], reference=True, feasible=False), row(1, 1, [[0.71], [0.716]]),
            row(2, 2, [[0.70], [0.69]])]
    summary = summarize_confirmation({**header(["metric"]), "directions": ["maximize"]}, rows, ["maximize"])
    assert summary["winner"]["trial"] == 1 and summary["architectures"][0]["trial"] == 0
    text = printed(summary, tmp_path)
    assert "| 0 (reference, infeasible) |" in text.replace("│", "|")
    assert ("winner: the confirmed winner, trial 1 (best mean metric of the architectures that can win, 0.713 +- "
            "0.004243 over 2 seed(s) at 1200 steps; search rank 1; ranked above it: trial 0, over the study's "
            "constraints)") in text
    # An architecture that diverged on a seed ranks on its other seeds, and cannot win either.
    summary = summarize_confirmation(header(["loss"], DIVERGED_7), [row(7, 1, [[0.931]]), row(4, 2, [[0.947]])],
                                     ["minimize"])
    assert "ranked above it: trial 7, diverged on a seed" in printed(summary, tmp_path)
    # The winner ranked first: nothing to say.
    summary = summarize_confirmation(header(["loss"]), [row(4, 1, [[0.9]]), row(0, 2, [[0.95]], reference=True)],
                                     ["minimize"])
    assert "(best mean loss 0.9 over 1 seed(s)" in printed(summary, tmp_path)

def test_a_failed_run_of_an_architecture_that_cannot_win_does_not_withhold_the_winner():
    """The reference missed the study's constraints: it is no candidate, so its failure changes no winner."""
    rows = [row(4, 1, [[0.947], [0.951], [0.944]]), row(0, None, [[0.962], [0.958]], reference=True, feasible=False)]
    failed = [{"trial": 0, "seed": 3, "reason": "diverged"}]
    summary = summarize_confirmation(header(["loss"], failed), rows, ["minimize"])
    assert summary["winner"]["trial"] == 4 and summary["winner_withheld"] is None


def test_a_reference_whose_runs_all_failed_is_said_to_have_no_result(tmp_path):
    """Architectures with three seeds each were told they had one result and no test when the reference had none."""
    failed = [{"trial": 0, "seed": seed, "reason": "diverged"} for seed in (1, 2, 3)]
    rows = [row(7, 1, [[0.931], [0.940], [0.935]]), row(4, 2, [[0.947], [0.951], [0.944]]),
            row(0, 3, [], reference=True)]
    summary = summarize_confirmation(header(["loss"], failed), rows, ["minimize"])
    for r in summary["architectures"]:
        if not r["reference"]:
            assert r["vs_reference"][0] == {"test": None, "p_value": None, "beats": None,
                                            "verdict": "no test: the reference has no result (its runs failed)"}
    assert summary["winner"] is None  # the reference could have been the winner
    text = printed(summary, tmp_path)
    assert "the reference has no result" in text and "one result: no test" not in text

    # One of the reference's runs succeeded: it has one result, still no test.
    rows[2] = row(0, 3, [[0.96]], reference=True)
    summary = summarize_confirmation(header(["loss"], failed[1:]), rows, ["minimize"])
    assert summary["architectures"][0]["vs_reference"][0]["verdict"].startswith(
        "no test: the reference has one result")


# ---------------------------------------------------------------- an objective the seed does not move


def test_a_multi_objective_confirmation_says_why_it_names_no_winner(tmp_path):
    """The console ended with the tests and the file, nothing of a winner, where one objective names one."""
    rows = [row(3, 1, [[1.20, 9700.0], [1.21, 9700.0], [1.19, 9700.0]]),
            row(0, 2, [[1.30, 8000.0], [1.31, 8000.0], [1.29, 8000.0]], reference=True)]
    summary = summarize_confirmation(header(["loss", "active_params"]), rows, ["minimize", "minimize"])
    assert summary["winner"] is None
    assert ("no winner: a study of 2 objectives has a Pareto front, not one best architecture; `fulu-nas export` "
            "takes trial=pareto:I or trial=N") in printed(summary, tmp_path)


def test_an_objective_the_same_on_every_seed_is_better_or_worse_exactly():
    """active_params is 9,700 on every seed against the reference's 8,000: it read "not distinguishable
    from the reference (p=1)" (Welch's t is +inf, its one-sided p 1)."""
    rows = [row(3, 1, [[1.20, 9700.0], [1.21, 9700.0], [1.19, 9700.0]]),
            row(5, 2, [[1.25, 7652.0], [1.26, 7652.0], [1.24, 7652.0]]),
            row(0, 3, [[1.30, 8000.0], [1.31, 8000.0], [1.29, 8000.0]], reference=True),
            row(1, 4, [[1.50, 8000.0], [1.40, 8000.0], [1.45, 8000.0]])]
    objectives = ["loss", "active_params"]
    summary = summarize_confirmation(header(objectives), rows, ["minimize", "minimize"])
    params = {r["trial"]: r["vs_reference"][1] for r in summary["architectures"] if r["vs_reference"]}
    # The p-value is the one-sided test's, as everywhere in the table: a value certainly worse has p = 1 of beating
    # the reference (it was 0, which a Bonferroni reading of the p-values counted as a win).
    assert params[3] == {"test": "exact: the same value on every seed", "p_value": 1.0, "beats": False,
                         "verdict": "worse than the reference (exact: the same value on every seed, p=1)"}
    assert params[5] == {"test": "exact: the same value on every seed", "p_value": 0.0, "beats": True,
                         "verdict": "beats the reference (exact: the same value on every seed, p=0)"}
    assert params[1]["beats"] is False and params[1]["verdict"] == (
        "not distinguishable from the reference (identical on every seed)")
    # Maximised: a larger constant value beats the reference.
    rows = [row(3, 1, [[0.9]] * 3), row(0, 2, [[0.8]] * 3, reference=True)]
    summary = summarize_confirmation({**header(["metric"]), "directions": ["maximize"]}, rows, ["maximize"])
    assert summary["architectures"][0]["vs_reference"][0]["verdict"].startswith("beats the reference (exact")


def test_export_says_why_the_confirmation_gave_it_no_winner():
    """trial=best said "no confirmation" of a study whose confirmation withheld its winner (runs failed)
    or was incomplete: export took the search's best for a reason it did not give."""
    from fulu_nas.search.confirm_summary import why_no_winner

    assert why_no_winner(None) == "no confirmation"
    assert why_no_winner({"complete": False, "winner": None}) == ("its confirmation is incomplete: runs without a "
                                                                   "result")
    withheld = "runs failed: trial 7 seed(s) 1, 2 (their means are over fewer seeds, and the failed seeds could change"
    assert why_no_winner({"complete": True, "winner": None, "winner_withheld": withheld}) == (
        f"its confirmation named no winner: {withheld}")

"""Confirmation (``fulu-nas confirm``): the chosen architectures and the reference trained again with
several seeds and a longer budget, nested in MLflow, summarised (ranks, Kendall's tau, Welch's
t-test against the reference); resuming after an interruption; ``study.confirm.enabled`` in a search;
export and dashboard reading the confirmation; bad input refused with nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from itertools import combinations
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import yaml
from scipy.stats import ttest_ind

import fulu_nas.search.confirm as confirm_module
from fulu_nas.cli import main
from fulu_nas.dashboard.panels.confirmation import panel_confirmation
from fulu_nas.search.app import compose_config
from fulu_nas.search.export_trial import choose_trial

from .test_export import settings_for
from .test_search_e2e import load_study, run_search

TrialState = optuna.trial.TrialState
CONFIRM = ["confirm", "study.name=tiny-clusters"]


def confirmation_runs(out, steps: int | None = None):
    """The study's confirmation runs in MLflow (those of one step budget when given)."""
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-clusters")
    runs = client.search_runs([experiment.experiment_id], "tags.`fulu.kind` = 'confirmation'", max_results=1000)
    return client, [r for r in runs if steps is None or r.data.tags["fulu.steps"] == str(steps)]


def recorded(out, steps: int) -> dict[str, dict]:
    return {k: v for k, v in load_study(out).user_attrs.items() if k.startswith("confirm:") and v["steps"] == steps}


def expected_architectures(study: optuna.Study, top_k: int) -> set[str]:
    """The top_k distinct architectures by loss, and the reference's."""
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE),
                      key=lambda t: (t.values[0], t.number))
    hashes = list(dict.fromkeys(t.user_attrs["arch_hash"] for t in complete))[:top_k]
    reference = next(t for t in complete if t.user_attrs.get("reference"))
    return set(hashes) | {reference.user_attrs["arch_hash"]}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished tiny search of 4 trials whose study.confirm asks for 2 seeds."""
    root = tmp_path_factory.mktemp("confirm")
    out = root / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert run_search(out, "study.n_trials=4", "study.pruner=none", "study.confirm.seeds=2") == 0
    return SimpleNamespace(root=root, out=out)


@pytest.fixture(scope="module")
def confirmed(searched):
    """The tiny search confirmed: top 2 and the reference, budget x2, the study's 2 seeds."""
    text = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(text):
        mp.chdir(searched.root)
        code = main([*CONFIRM, f"hydra.run.dir={searched.out}", "top_k=2", "budget_factor=2"])
    assert code == 0
    summary = json.loads((searched.out / "confirmation.json").read_text())
    return SimpleNamespace(**vars(searched), summary=summary, text=text.getvalue())


# ---------------------------------------------------------------- the command, end to end


@pytest.mark.slow
def test_confirm_end_to_end(confirmed):
    out, summary = confirmed.out, confirmed.summary
    study = load_study(out)
    assert summary == study.user_attrs["confirmation"]
    expected = expected_architectures(study, 2)
    assert {a["arch_hash"] for a in summary["architectures"]} == expected
    # Seeds after the search's trainer.seed (0), which the search selected its architectures on.
    assert (summary["top_k"], summary["budget_factor"], summary["steps"], summary["seeds"]) == (2, 2, 120, [1, 2])
    assert summary["failed_runs"] == []

    # (top_k + the reference) x seeds runs, nested under the study's parent run and tagged.
    client, runs = confirmation_runs(out)
    assert len(runs) == len(expected) * 2
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted((r.data.tags["fulu.arch_hash"], r.data.tags["fulu.seed"]) for r in runs) == sorted(
        (h, s) for h in expected for s in ("1", "2"))
    assert {r.data.tags["fulu.steps"] for r in runs} == {"120"}
    by_id = {r.info.run_id: r for r in runs}
    for a in summary["architectures"]:
        trial = study.trials[a["trial"]]
        assert trial.user_attrs["arch_hash"] == a["arch_hash"] and a["search_values"] == trial.values
        assert len(a["runs"]) == 2
        for run in a["runs"]:
            logged = by_id[run["mlflow_run_id"]]
            assert logged.data.tags["fulu.trial"] == str(a["trial"])
            assert logged.data.params["moe.router"] == trial.params["router"]  # params: the architecture
            assert logged.data.params["train_step"] == "eager, deterministic"  # auto: eager on the CPU
            assert logged.data.metrics["loss"] == pytest.approx(run["values"][0])
            assert logged.data.metrics["train_steps"] == 120
    assert "confirmation.json" in {f.path for f in client.list_artifacts(parent)}

    # Ranks: the search's among distinct architectures, the confirmed one by the mean over seeds.
    measured = [a for a in summary["architectures"] if a["confirmed_rank"] is not None]
    assert sorted(a["search_rank"] for a in measured if not a["reference"]) == [1, 2]
    by_mean = sorted(measured, key=lambda a: sum(r["values"][0] for r in a["runs"]))
    assert [a["confirmed_rank"] for a in by_mean] == list(range(1, len(measured) + 1))
    for a in measured:
        losses = [r["values"][0] for r in a["runs"]]
        assert a["mean"][0] == pytest.approx(sum(losses) / 2)
        assert a["sd"][0] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))

    # Kendall's tau by hand: (concordant - discordant pairs) / pairs.
    pairs = [(a["search_rank"], a["confirmed_rank"]) for a in measured if a["search_rank"] is not None]
    signs = [(x1 - x2) * (y1 - y2) > 0 for (x1, y1), (x2, y2) in combinations(pairs, 2)]
    assert summary["kendall_tau"]["tau"] == pytest.approx((2 * sum(signs) - len(signs)) / len(signs))

    # Beats the reference: scipy's one-sided Welch test on the recorded values.
    reference = next(a for a in summary["architectures"] if a["reference"])
    ref_losses = [r["values"][0] for r in reference["runs"]]
    assert reference["vs_reference"] is None and summary["reference"] == reference["trial"]
    for a in summary["architectures"]:
        if a["reference"]:
            continue
        p = ttest_ind([r["values"][0] for r in a["runs"]], ref_losses, equal_var=False, alternative="less").pvalue
        verdict = a["vs_reference"][0]
        assert verdict["p_value"] == pytest.approx(p) and verdict["beats"] == (p < 0.05)
        assert verdict["verdict"] == (f"beats the reference (Welch's t-test, one-sided, p={p:.3g})" if p < 0.05
                                      else f"not distinguishable from the reference (p={p:.3g})")
        assert f"(p={p:.3g})" in confirmed.text  # the table's cell (wrapped, so not the whole sentence)
    winner = min((a for a in measured), key=lambda a: a["mean"][0])
    assert summary["winner"]["trial"] == winner["trial"]
    assert "Kendall's tau (search rank vs confirmed rank)" in confirmed.text
    assert "Welch's t-test (scipy.stats.ttest_ind, equal_var=False), one-sided" in confirmed.text


@pytest.mark.slow
def test_an_interrupted_confirmation_resumes_without_repeating_runs(searched, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(searched.out, out)
    monkeypatch.chdir(tmp_path)
    real, trained, stop_at = confirm_module.train_architecture, [], [2]

    def ctrl_c_during_the_second_run(arch, s, cfg, on_report, kernels=None):
        trained.append((arch.content_hash(), cfg.seed))
        if len(trained) in stop_at:
            raise KeyboardInterrupt
        return real(arch, s, cfg, on_report, kernels)

    monkeypatch.setattr(confirm_module, "train_architecture", ctrl_c_during_the_second_run)
    args = [*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "budget_factor=1", "seeds=2"]
    assert main(args) == 130
    assert "run the same command to resume" in capsys.readouterr().err
    first = recorded(out, 60)
    assert len(first) == 1
    client, runs = confirmation_runs(out, 60)
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]

    # A process killed outright leaves its run RUNNING: one whose result was never recorded, and (killed
    # between recording and closing) the recorded one.
    study = load_study(out)
    orphan = client.create_run(runs[0].info.experiment_id, tags={
        "mlflow.parentRunId": study.user_attrs["mlflow_parent_run_id"], "fulu.kind": "confirmation",
        "fulu.steps": "60"}).info.run_id
    (done,) = first.values()
    client.update_run(done["mlflow_run_id"], status="RUNNING")

    stop_at.clear()
    trained.clear()
    assert main(args) == 0
    total = len(expected_architectures(study, 1)) * 2
    assert len(trained) == total - 1  # only the runs that were not recorded
    assert (done["arch_hash"], done["seed"]) not in trained
    everything = recorded(out, 60)
    assert len(everything) == total and everything[next(iter(first))] == done
    _, runs = confirmation_runs(out, 60)
    status = {r.info.run_id: r.info.status for r in runs}
    assert status[orphan] == "KILLED" and status[done["mlflow_run_id"]] == "FINISHED"
    assert sum(s == "FINISHED" for s in status.values()) == total
    summary = json.loads((out / "confirmation.json").read_text())
    assert sum(len(a["runs"]) for a in summary["architectures"]) == total


@pytest.mark.slow
def test_a_divergence_is_that_seeds_outcome_and_other_failures_are_retried(searched, tmp_path, monkeypatch,
                                                                          capsys):
    """The search's best diverges at one seed (training is seeded: it diverges again whenever it is run
    again), another architecture hits the safety cap once. The divergence rules its architecture out
    and is not trained again; the cap withholds the winner until a second invocation trains that run."""
    from fulu_nas.training.train import BudgetCapReached, TrainingDiverged

    out = tmp_path / "out"
    shutil.copytree(searched.out, out)
    monkeypatch.chdir(tmp_path)
    study = load_study(out)
    complete = sorted((t for t in study.trials if t.state == TrialState.COMPLETE),
                      key=lambda t: (t.values[0], t.number))
    ranked = list(dict.fromkeys(t.user_attrs["arch_hash"] for t in complete))
    best, second = ranked[0], ranked[1]
    real, trained, capped = confirm_module.train_architecture, [], []

    def diverge_or_cap(arch, s, cfg, on_report, kernels=None):
        key = (arch.content_hash(), cfg.seed)
        trained.append(key)
        if key[0] == best and cfg.seed == 2:
            raise TrainingDiverged(17, float("nan"), "not finite")
        if key[0] == second and cfg.seed == 1 and not capped:
            capped.append(key)
            raise BudgetCapReached("over the cap")
        return real(arch, s, cfg, on_report, kernels)

    monkeypatch.setattr(confirm_module, "train_architecture", diverge_or_cap)
    args = [*CONFIRM, f"hydra.run.dir={out}", "top_k=2", "budget_factor=1", "seeds=2"]
    assert main(args) == 0
    text = " ".join(capsys.readouterr().out.split())
    summary = json.loads((out / "confirmation.json").read_text())
    by_hash = {a["arch_hash"]: a for a in summary["architectures"]}
    assert by_hash[best]["diverged_seeds"] == [2] and by_hash[best]["failed_seeds"] == []
    assert by_hash[second]["failed_seeds"] == [1] and by_hash[second]["diverged_seeds"] == []
    assert summary["winner"] is None and summary["winner_withheld"].startswith(
        f"runs failed: trial {by_hash[second]['trial']} seed(s) 1")
    assert (f"diverged: trial {by_hash[best]['trial']} seed 2: diverged: training diverged at step 17" in text
            and "not trained again" in text)

    trained.clear()
    assert main(args) == 0
    assert trained == [(second, 1)]  # the capped run again; the divergence is not repeated
    summary = json.loads((out / "confirmation.json").read_text())
    by_hash = {a["arch_hash"]: a for a in summary["architectures"]}
    assert by_hash[best]["diverged_seeds"] == [2] and by_hash[second]["failed_seeds"] == []
    survivors = [a for a in summary["architectures"] if a["feasible"] and a["arch_hash"] != best]
    expected = min(survivors, key=lambda a: (a["mean"][0], a["search_rank"] or math.inf))
    assert summary["winner"]["trial"] == expected["trial"] != by_hash[best]["trial"]
    assert load_study(out).user_attrs["confirmation"]["winner"]["trial"] == expected["trial"]


@pytest.mark.slow
def test_a_confirmation_on_two_workers_records_what_one_process_does(searched, tmp_path, monkeypatch, capsys):
    """n_workers=2 shares the runs between two processes: every run is recorded once, with the values
    a sequential confirmation records (CPU training is deterministic), and the summary is the same.
    The bar shows the workers' running runs, their step and loss, as one process's shows its own."""
    import re

    monkeypatch.chdir(tmp_path)
    outs = {n: tmp_path / f"out{n}" for n in (1, 2)}
    results, summaries = {}, {}
    for n, out in outs.items():
        shutil.copytree(searched.out, out)
        assert main([*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "budget_factor=6", f"n_workers={n}"]) == 0
        console, bar = capsys.readouterr()
        shown = re.findall(r"trial \d+ seed \d+: step (\d+) loss \d+\.\d{4}", bar)
        assert shown and all(0 < int(step) <= 360 for step in shown), bar[-2000:]
        assert not list(out.glob(".*progress*"))
        results[n] = recorded(out, 360)
        summaries[n] = json.loads((out / "confirmation.json").read_text())
        for result in results[n].values():
            assert f"trial {result['trial']} seed {result['seed']}: loss={result['values'][0]:.4g}" in console
        _, runs = confirmation_runs(out, 360)
        assert len(runs) == len(results[n]) and {r.info.status for r in runs} == {"FINISHED"}
    assert results[2].keys() == results[1].keys() and len(results[1]) == 2 * 2  # (top 1 + reference) x 2 seeds
    assert {k: v["values"] for k, v in results[2].items()} == {k: v["values"] for k, v in results[1].items()}
    assert sorted(p.name for p in outs[2].glob("confirm-worker-*.log")) == ["confirm-worker-0.log",
                                                                             "confirm-worker-1.log"]
    assert not list(outs[1].glob("confirm-worker-*.log"))
    assert [a["mean"] for a in summaries[2]["architectures"]] == [a["mean"] for a in summaries[1]["architectures"]]


def test_a_study_that_cannot_be_written_is_refused_before_any_run(searched, tmp_path, monkeypatch, capsys):
    """A confirmation records its runs in the study's databases and writes confirmation.json beside
    them: on a read-only study folder it used to train, then end in an MLflow error line and a
    SQLAlchemy traceback ("attempt to write a readonly database")."""
    from .helpers import read_only_copy

    monkeypatch.chdir(tmp_path)
    with read_only_copy(searched.out, tmp_path / "ro") as out:
        code = main([*CONFIRM, f"hydra.run.dir={out}", "top_k=1", "seeds=1"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.startswith("error: cannot confirm:\n  - ") and err.count("\n") == 2, err
        assert "read-only" in err and str(out) in err


def test_the_tracking_uri_given_is_the_one_recorded_into(searched, tmp_path, monkeypatch, capsys):
    """confirm took any tracking.uri= and recorded into the search's database all the same: a database moved
    elsewhere was left without the runs, a misspelt one passed without a word (export and dashboard refuse it)."""
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    shutil.copytree(searched.out, out)
    elsewhere.mkdir()
    shutil.move(out / "mlflow.db", elsewhere / "mlflow.db")
    monkeypatch.chdir(tmp_path)
    code = main([*CONFIRM, f"hydra.run.dir={out}", f"tracking.uri=sqlite:///{tmp_path / 'nope.db'}", "top_k=1",
                 "seeds=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot confirm:\n  - tracking.uri: ") and err.count("\n") == 2, err
    assert not (tmp_path / "nope.db").exists() and not (out / "mlflow.db").exists()
    assert main([*CONFIRM, f"hydra.run.dir={out}", f"tracking.uri=sqlite:///{elsewhere / 'mlflow.db'}", "top_k=1",
                 "seeds=1"]) == 0, capsys.readouterr().err
    assert not (out / "mlflow.db").exists()
    _, runs = confirmation_runs(elsewhere)
    assert runs and all(r.info.status == "FINISHED" for r in runs)


def test_n_workers_must_be_a_positive_whole_number(searched, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(searched.out, out)
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in out.iterdir())
    for bad in ("0", "two", "1.5", "1" * 5000):  # 5,000 digits: int()'s ValueError traceback
        assert main([*CONFIRM, f"hydra.run.dir={out}", f"n_workers={bad}"]) == 2
        err = capsys.readouterr().err
        assert "n_workers: must be a whole number of at least 1" in err and err.count("\n") == 2
    assert main([*CONFIRM, f"hydra.run.dir={out}", f"seeds={'1' * 5000}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot confirm:\n  - seeds: ") and err.count("\n") == 2
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_a_search_with_confirm_enabled_confirms_at_the_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert run_search(out, "study.n_trials=2", "study.pruner=none", "study.confirm.enabled=true",
                      "study.confirm.top_k=2", "study.confirm.seeds=1", "study.confirm.budget_factor=1") == 0
    text = capsys.readouterr().out
    study = load_study(out)
    summary = json.loads((out / "confirmation.json").read_text())
    assert summary == study.user_attrs["confirmation"]
    assert (summary["steps"], summary["seeds"]) == (60, [1])
    assert {a["arch_hash"] for a in summary["architectures"]} == expected_architectures(study, 2)
    _, runs = confirmation_runs(out)
    assert len(runs) == len(summary["architectures"])
    for a in summary["architectures"]:
        # At the search's own budget, a run of the search's seed was a copy of the trial the search selected
        # (the same validation loss), counted as an independent sample; the confirmation's seed is a new draw.
        assert a["runs"][0]["seed"] == 1
        assert a["runs"][0]["values"][0] != pytest.approx(a["search_values"][0], rel=1e-5)
        if not a["reference"]:
            assert a["vs_reference"][0]["test"] is None and a["vs_reference"][0]["beats"] is None
    assert "one result: no test" in text


# ---------------------------------------------------------------- what reads a confirmation


@pytest.mark.slow
def test_export_best_takes_the_confirmed_winner(confirmed, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "model"
    assert main(["export", "study.name=tiny-clusters", f"hydra.run.dir={confirmed.out}", f"out={target}"]) == 0
    winner = confirmed.summary["winner"]["trial"]
    said = f"trial=best: the confirmed winner, trial {winner} (best mean loss "
    assert f"exporting trial {winner}: {said}" in capsys.readouterr().out
    metrics = json.loads((target / "metrics.json").read_text())
    config = yaml.safe_load((target / "config.yaml").read_text())
    assert metrics["selected_by"].startswith(said) and config["source"]["selected_by"] == metrics["selected_by"]
    assert config["source"]["trial"] == winner
    # Any other selection is the search's, as before.
    trial, how = choose_trial(load_study(confirmed.out), settings_for(["loss"], ["minimize"]), "0")
    assert (trial.number, how) == (0, "trial=0")


@pytest.mark.slow
def test_export_best_refuses_a_confirmation_that_trials_added_since_have_outranked(confirmed, tmp_path):
    """A study extended after its confirmation: trial=best took the old confirmed winner without a word,
    though a new architecture now ranked among the search's best."""
    import shutil

    from fulu_nas.errors import FuluConfigError

    shutil.copyfile(confirmed.out / "optuna.db", tmp_path / "optuna.db")
    study = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    settings = settings_for(["loss"], ["minimize"])
    assert choose_trial(study, settings, "best")[0].number == confirmed.summary["winner"]["trial"]
    template = next(t for t in study.trials if t.state == TrialState.COMPLETE)
    best = min(t.values[0] for t in study.trials if t.state == TrialState.COMPLETE)
    study.add_trial(optuna.trial.create_trial(
        params=template.params, distributions=template.distributions, value=best - 0.1,
        user_attrs={**template.user_attrs, "arch_hash": "a-new-architecture", "reference": False}))
    # the advice locates the study as the search's own settings do (its folder is not outputs/NAME here)
    from fulu_nas.search.locate import locate_study, search_settings

    location = locate_study(["study.name=tiny-clusters", f"hydra.run.dir={confirmed.out}"])
    searched = search_settings(location, load_study(confirmed.out))
    with pytest.raises(FuluConfigError, match="confirmation is out of date: trial.s. 4 ranked among") as refused:
        choose_trial(study, searched, "best")
    assert f"hydra.run.dir={confirmed.out.resolve()}" in searched.locating_overrides()[1]
    assert f"run fulu-nas confirm {' '.join(searched.locating_overrides())} again" in str(refused.value)
    assert choose_trial(study, settings, "4")[0].number == 4  # a named trial is still taken


@pytest.mark.slow
def test_dashboard_draws_the_confirmation(confirmed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = tmp_path / "dashboard.html"
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={confirmed.out}", f"out={page}"]) == 0
    section = page.read_text().split('<section id="panel-confirmation"')[1].split("</section>")[0]
    assert section.count('class="plotly-graph-div"') == 1
    assert "search rank vs confirmed rank" in section and "loss: mean +- sd over seeds" in section
    assert "(reference)" in section and "Kendall&#x27;s tau between the rankings" in section


def test_the_panel_says_when_there_is_no_confirmation(tmp_path, monkeypatch):
    """Its command named the study alone: for a study outside outputs/NAME (hydra.run.dir, a multirun's job)
    it was refused, "no study database at outputs/NAME/optuna.db"."""
    from fulu_nas.search.app import compose_config
    from fulu_nas.search.settings import load_settings

    monkeypatch.chdir(tmp_path)
    named = "fulu-nas confirm study.name=tiny-clusters"
    for folder, command in ((None, named), (tmp_path / "run", f"{named} hydra.run.dir={tmp_path / 'run'}")):
        overrides = ["+experiment=tiny", *([f"hydra.run.dir={folder}"] if folder else [])]
        settings = load_settings(*compose_config(overrides))
        ctx = SimpleNamespace(study=SimpleNamespace(user_attrs={}, study_name="tiny-clusters"), s=settings,
                              complete=["a complete trial"])  # something to confirm
        blocks = panel_confirmation(ctx, {})
        assert len(blocks) == 1 and f"`{command}` trains its best architectures" in blocks[0], blocks


# ---------------------------------------------------------------- bad input


def hand_made_study(folder, trial) -> optuna.Study:
    """A study named tiny-clusters in ``folder`` with the tiny search's configuration and one trial."""
    folder.mkdir()
    cfg, _ = compose_config(["+experiment=tiny"])
    (folder / "search_config.json").write_text(json.dumps({"config": cfg}))
    study = optuna.create_study(study_name="tiny-clusters", storage=f"sqlite:///{folder / 'optuna.db'}")
    study.add_trial(trial)
    return study


def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(CONFIRM) == 2
    assert "no study database" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

    dist = {"top_k": optuna.distributions.CategoricalDistribution([1, 2])}
    failed = optuna.trial.create_trial(state=TrialState.FAIL, params={"top_k": 1}, distributions=dist)
    broken = optuna.trial.create_trial(values=[1.0], params={"top_k": 1}, distributions=dist,
                                       user_attrs={"arch": {"bogus": 1}, "arch_hash": "x", "reference": True})
    cases = [(tmp_path / "none", failed, [], "study.name: study 'tiny-clusters' has no complete trial"),
             (tmp_path / "broken", broken, [],
              "trial 0: its architecture (the arch attribute) cannot be rebuilt: unknown architecture keys: bogus"),
             (tmp_path / "options", broken, ["top_k=0", "budget_factor=inf", "seeds=two"],
              "top_k: expected an integer >= 1, got 0\n  - seeds: expected an integer >= 1, got 'two'\n"
              "  - budget_factor: expected a finite number in [1, 1000], got inf"),
             # Python's int() and float() read these as 10, 3 and 2
             (tmp_path / "digits", broken, ["top_k=1_0", "seeds=\u0663", "budget_factor= 2 "],
              "top_k: expected an integer >= 1, got '1_0'\n  - seeds: expected an integer >= 1, got '\u0663'\n"
              "  - budget_factor: expected a finite number in [1, 1000], got ' 2 '"),
             # the default (8 architectures x 3 seeds x 4 times the budget), the last value: without a word
             (tmp_path / "empty", broken, ["top_k=", "seeds=1", "seeds=2"],
              "top_k: empty; give a value, or leave top_k= out for its default\n"
              "  - seeds: given twice ('1', then '2'); give it once"),
             # an override given twice: Hydra took the last one
             (tmp_path / "twice", broken, ["study.name=other"],
              "study.name: given twice ('tiny-clusters', then 'other'); give it once"),
             # an override that locates the study, empty (an unset shell variable): the default, unasked
             (tmp_path / "unset", broken, ["study.storage="],
              "study.storage: empty (an unset shell variable?); give a value, or leave study.storage= out"),
             (tmp_path / "nested", broken, ["study.confirm.top_k=3"],
              "study.confirm.top_k=3: not used: this command works with the search's own settings, where "
              "study.confirm.top_k is 8 (3 here)")]
    for folder, trial, extra, message in cases:
        study = hand_made_study(folder, trial)
        before = sorted(p.name for p in folder.iterdir())
        assert main([*CONFIRM, f"hydra.run.dir={folder}", *extra]) == 2
        assert message in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == before  # no confirmation.json, no MLflow database
        assert study.user_attrs == {} and len(study.trials) == 1


def test_bad_confirm_settings_in_a_search_name_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for override, message in (("study.confirm.top_k=0", "study.confirm.top_k: expected an integer >= 1, got 0"),
                              ("study.confirm.budget_factor=nan", "study.confirm.budget_factor: expected a finite"),
                              ("study.confirm.seeds=1.5", "study.confirm.seeds: expected an integer >= 1, got 1.5"),
                              ("study.confirm.enabled=maybe", "study.confirm.enabled: expected true or false")):
        assert run_search(tmp_path / "out", override) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n  - ") == 1, err
    assert list(tmp_path.iterdir()) == []

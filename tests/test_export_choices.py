"""``fulu-nas export``: which trial it may take (a study whose every trial breaks its constraints), the
option values it refuses before any work, and what a failed registration leaves behind (nothing)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search.export_trial import select_trial

from .test_search_e2e import run_search


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny two-trial study bounded to active_params <= 1, so that both its complete trials are infeasible
    (shared by the tests of this module; no test registers a model under its default name)."""
    root = tmp_path_factory.mktemp("choices")
    out = root / "out"
    cwd = os.getcwd()
    os.chdir(root)
    try:
        # no trial within the constraints: the search has no result (exit 1), and the export is asked for one
        assert run_search(out, "study.n_trials=2", "study.pruner=none", "study.constraints={active_params:1}") == 1
    finally:
        os.chdir(cwd)
    return SimpleNamespace(root=root, out=out, tracking=f"sqlite:///{out / 'mlflow.db'}")


def test_a_study_whose_complete_trials_all_break_a_constraint_has_no_result(study):
    """A finished study whose complete trials were all infeasible exited 0 with no result: a script running
    `fulu-nas search && fulu-nas export` learnt it only from the export. It now ends as a study whose trials
    all failed does: exit 1 (the fixture's search), its parent run FAILED with the reason."""
    import mlflow

    summary = json.loads((study.out / "summary.json").read_text())
    assert summary["n_complete"] == 2 and summary["n_infeasible"] == 2 and "best" not in summary
    client = mlflow.MlflowClient(study.tracking)
    experiment = client.get_experiment_by_name("tiny-clusters")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`fulu.kind` = 'study'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags["fulu.reason"].startswith("no complete trial of study tiny-clusters is within "
                                                      "study.constraints (2 complete, 2 infeasible)")


def export(study, capsys, *args: str) -> tuple[int, str, str]:
    """``fulu-nas export`` of the module's study: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main(["export", "study.name=tiny-clusters", f"hydra.run.dir={study.out}", *args])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def registry_state(study) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The study's MLflow runs (id, status) and registered model versions (name, version)."""
    import mlflow

    client = mlflow.MlflowClient(study.tracking)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = sorted((r.info.run_id, r.info.status) for r in client.search_runs(experiments, max_results=1000))
    versions = sorted((v.name, v.version) for v in client.search_model_versions())
    return runs, versions


def logged_models(study) -> list[str]:
    """The MLflow logged models of the study's experiments (each registration logs one)."""
    import mlflow

    client = mlflow.MlflowClient(study.tracking)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sorted(m.model_id for m in client.search_logged_models(experiments))


def refused_before_work(code: int, out: str, err: str, *phrases: str) -> None:
    """Exit code 2, one message holding each of ``phrases``, and nothing evaluated, measured or written."""
    assert code == 2, err
    assert err.startswith("error: cannot export:\n  - ") and err.count("\n") == 2, err
    assert all(p in err for p in phrases), err
    assert "exporting trial" not in out


def test_a_study_without_a_feasible_trial_has_no_best_fastest_or_pareto_trial(study, tmp_path, capsys):
    """best, fastest_within and (single-objective) pareto exported an infeasible trial and moved `champion`
    to it; they are refused, naming the way to export one anyway (trial=N)."""
    before = registry_state(study)
    for spec in ("best", "fastest_within:5", "pareto:0"):
        refused_before_work(*export(study, capsys, f"trial={spec}", f"out={tmp_path / 'model'}"),
                            "no feasible trial: all 2 complete trials of study 'tiny-clusters' break "
                            "study.constraints (active_params <= 1)", "trial=N")
    assert not (tmp_path / "model").exists()
    assert registry_state(study) == before


def test_an_infeasible_trial_named_by_number_is_exported_through_a_link_to_an_empty_folder(study, tmp_path, capsys):
    """trial=N still exports an infeasible trial, and says it breaks the constraints (console, metrics.json,
    model card). out= a link to an empty folder is followed: the export used to do all its work, then fail
    on the link with a NotADirectoryError traceback."""
    target = tmp_path / "empty"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    code, out, err = export(study, capsys, "trial=1", f"out={tmp_path / 'link'}", "name=infeasible-one")
    assert code == 0, err
    assert "breaks study.constraints (active_params)" in out
    assert (tmp_path / "link").is_symlink() and (target / "checksums.json").is_file()
    assert "breaks study.constraints (active_params)" in json.loads((target / "metrics.json").read_text())[
        "selected_by"]
    assert "breaks study.constraints (active_params)" in (target / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "link"]  # no partial folder left


@pytest.mark.parametrize("where", ["dangling", "loop", "to_a_file", "to_a_full_folder"])
def test_out_a_link_to_nothing_or_to_something_taken_is_refused_before_any_work(study, tmp_path, capsys, where):
    link = tmp_path / "link"
    target = {"dangling": tmp_path / "nowhere", "loop": link, "to_a_file": tmp_path / "file",
              "to_a_full_folder": tmp_path / "full"}[where]
    if where == "to_a_file":
        target.write_text("x")
    if where == "to_a_full_folder":
        target.mkdir()
        (target / "kept").write_text("x")
    link.symlink_to(target)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    refused_before_work(*export(study, capsys, "trial=0", f"out={link}"), "out: ")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before and link.is_symlink()


@pytest.mark.parametrize("name", ["   ", " lead", "trail ", "a b "])
def test_a_name_of_spaces_or_with_spaces_around_it_is_refused_before_any_work(study, tmp_path, capsys, name):
    """MLflow refuses a name of spaces only when registering: the whole folder was written first, and left."""
    before = registry_state(study)
    refused_before_work(*export(study, capsys, "trial=0", f"out={tmp_path / 'model'}", f"name={name}"),
                        f"name: {name!r}")
    assert not (tmp_path / "model").exists() and registry_state(study) == before


def test_a_failed_registration_leaves_no_folder_no_open_run_and_no_version(study, tmp_path, capsys, monkeypatch):
    """The folder was renamed into place before the model was registered; a registry failure left it (and a
    re-run then said 'out: ... is not empty'). Here the registry refuses the last step, the alias."""
    import mlflow
    from mlflow.exceptions import MlflowException

    def refuse(self, name, alias, version):  # the registry failing: not the code under test
        raise MlflowException("the registry is unavailable")

    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", refuse)
    runs_before, versions_before = registry_state(study)
    target = tmp_path / "empty"
    target.mkdir()
    code, out, err = export(study, capsys, "trial=0", f"out={target}", "name=unlucky")
    assert code == 2, err
    assert err.count("\n") == 2 and "tracking.uri: registering 'unlucky'" in err
    assert "the registry is unavailable" in err
    assert target.is_dir() and not any(target.iterdir())  # the empty folder it was given, as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    runs, versions = registry_state(study)
    new = [status for run, status in runs if run not in dict(runs_before)]
    assert new == ["FAILED"]  # the export's run is closed, not left RUNNING
    assert versions == versions_before  # the version without its alias is removed


@pytest.mark.parametrize("factor", ["1e308", "0.001", "1e-300"])
def test_a_retrain_factor_that_gives_no_trainable_step_count_is_named(study, tmp_path, capsys, factor):
    """1e308 ended in an OverflowError traceback (now past the bound of 1000); 0.001 was refused as 'steps:
    ... got 0', an option the user never passed."""
    refused_before_work(*export(study, capsys, "trial=0", "retrain=true", f"retrain_factor={factor}",
                                f"out={tmp_path / 'model'}"), "retrain_factor: ")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("spec", ["²", "٣", "1²"])
def test_a_trial_number_in_other_than_ascii_digits_is_a_bad_choice(study, tmp_path, capsys, spec):
    """str.isdigit() holds for '²', which int() refuses: a ValueError traceback."""
    refused_before_work(*export(study, capsys, f"trial={spec}", f"out={tmp_path / 'model'}"),
                        f"trial: expected best, a trial number, pareto:<i> or fastest_within:<pct>, got {spec!r}")


def constrained_study(directions, rows):
    """An in-memory study of complete trials (values, loss, latency, constraint: > 0 breaks it)."""
    study = optuna.create_study(directions=directions)
    for values, loss, latency, over in rows:
        study.add_trial(optuna.trial.create_trial(values=values, system_attrs={"constraints:active_params": over},
                                                  user_attrs={"metrics": {"loss": loss, "latency_ms": latency}}))
    return study


def settings_for(objectives):
    return SimpleNamespace(study=SimpleNamespace(name="s", objectives=objectives, directions=["minimize"] * len(
        objectives), multi_objective=len(objectives) > 1, constraints=(("active_params", 100.0),)))


def test_selection_takes_feasible_trials_only_and_parses_ascii_digits_only():
    # trial 1 has the lowest loss but breaks the bound: best and pareto:0 take trial 2, fastest_within trial 0
    mixed = constrained_study(["minimize"], [([2.0], 2.0, 1.0, -1.0), ([1.0], 1.0, 0.1, 5.0),
                                             ([1.5], 1.5, 5.0, 0.0)])
    s = settings_for(["loss"])
    assert select_trial(mixed, s, "best").number == 2
    assert select_trial(mixed, s, "pareto:0").number == 2
    assert select_trial(mixed, s, "fastest_within:50").number == 0
    assert select_trial(mixed, s, "1").number == 1  # named: taken although infeasible
    # a trial the study does not have, or one that did not complete, is named as such ("not a complete trial")
    with pytest.raises(FuluConfigError, match=r"trial 99 of study 's' does not exist \(its trials are 0 to 2\); "
                                              r"complete trials: 0, 1, 2"):
        select_trial(mixed, s, "99")
    mixed.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    with pytest.raises(FuluConfigError, match=r"trial 3 of study 's' is FAIL, not COMPLETE; complete trials: 0, 1, 2"):
        select_trial(mixed, s, "3")
    for spec in ("pareto:²", "pareto:١", "pareto:0²"):
        with pytest.raises(FuluConfigError, match="pareto:<i> needs i in 0..0"):
            select_trial(mixed, s, spec)
    assert select_trial(mixed, s, "fastest_within:50.0").number == 0
    assert select_trial(mixed, s, "fastest_within:.5").number == 2  # a plain decimal without its 0
    with pytest.raises(FuluConfigError, match="pareto:<i> needs i in 0..0"):  # int(): a ValueError traceback
        select_trial(mixed, s, "pareto:" + "1" * 5000)
    # float() took '5_0' as 50, and 340 digits as inf
    for spec in ("5_0", "1e1", " 50", "٥٠", "+50", "nan", "9" * 340):
        with pytest.raises(FuluConfigError, match="needs a finite percentage >= 0, a plain decimal number"):
            select_trial(mixed, s, f"fastest_within:{spec}")

    none = constrained_study(["minimize"], [([2.0], 2.0, 1.0, 1.0), ([1.0], 1.0, 0.1, 5.0)])
    for spec in ("best", "pareto:0", "fastest_within:5"):
        with pytest.raises(FuluConfigError, match=r"no feasible trial: all 2 complete trials .* trial=N"):
            select_trial(none, s, spec)
    multi = constrained_study(["minimize", "minimize"], [([2.0, 1.0], 2.0, 1.0, 1.0), ([1.0, 2.0], 1.0, 2.0, 1.0)])
    m = settings_for(["loss", "latency_ms"])
    for spec in ("pareto:0", "fastest_within:5"):
        with pytest.raises(FuluConfigError, match="no feasible trial"):
            select_trial(multi, m, spec)


class Escaped(BaseException):
    """What the test's own SIGTERM handler raises: a SIGTERM that no handler of the export took."""


@pytest.mark.parametrize("when", ["writing", "registering"])
def test_sigterm_ends_the_export_as_ctrl_c_does(study, tmp_path, capsys, monkeypatch, when):
    """SIGTERM (timeout, docker stop, a batch scheduler) killed the export: a complete-looking folder that was
    never registered, or a hidden partial one, and the export's MLflow run left RUNNING. It is now undone as
    a Ctrl-C is: nothing written, no new version, the run ended, exit code 130. The signal is sent from
    inside the step, to this process, as a stop from outside would arrive."""
    import signal

    from fulu_nas.deploy import export as deploy_export
    from fulu_nas.deploy import serve

    def escaped(signum, frame):
        raise Escaped  # without a handler of its own, the export would have died here

    module, attribute = (deploy_export, "save_pyfunc") if when == "writing" else (serve, "record_registered_files")
    step = getattr(module, attribute)

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return step(*args, **kwargs)

    monkeypatch.setattr(module, attribute, stopped)
    previous = signal.signal(signal.SIGTERM, escaped)
    try:
        runs_before, versions_before = registry_state(study)
        code, out, err = export(study, capsys, "trial=0", f"out={tmp_path / 'model'}", "name=stopped")
        assert signal.getsignal(signal.SIGTERM) is escaped  # the export's handler is gone again
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a partial one
    runs, versions = registry_state(study)
    assert versions == versions_before
    new = [status for run, status in runs if run not in dict(runs_before)]
    assert "RUNNING" not in new and len(new) == (1 if when == "registering" else 0), new


def test_out_the_current_folder_is_refused_before_any_work(study, tmp_path, capsys, monkeypatch):
    """out=. (the empty current folder) did all the work, then failed on rmdir('.') with a traceback: the
    folder is renamed into place, which the current folder (any process's in it) cannot take."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    before = registry_state(study)
    for out in (".", str(here), "../here"):
        refused_before_work(*export(study, capsys, "trial=0", f"out={out}"), f"out: {out} is the current folder")
    assert list(tmp_path.iterdir()) == [here] and not any(here.iterdir())
    assert registry_state(study) == before


def registering_step_does(monkeypatch, action) -> None:
    """``action(client, name, version)`` runs inside the export's registration, before its files are recorded."""
    from fulu_nas.deploy import serve

    step = serve.record_registered_files

    def step_with_action(client, name, version, *args, **kwargs):
        action(client, name, version)
        return step(client, name, version, *args, **kwargs)

    monkeypatch.setattr(serve, "record_registered_files", step_with_action)


def test_an_export_interrupted_while_registering_leaves_the_registry_as_it_was(study, tmp_path, capsys, monkeypatch):
    """Ctrl-C during the registration was raised once the alias had moved; undoing the new version then took
    `champion` with it: the previous champion was no longer served, and the console said nothing changed."""
    import signal

    import mlflow

    client = mlflow.MlflowClient(study.tracking)
    assert export(study, capsys, "trial=0", f"out={tmp_path / 'first'}", "name=kept")[0] == 0
    champion = client.get_model_version_by_alias("kept", "champion").version
    registering_step_does(monkeypatch, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    runs_before, versions_before = registry_state(study)
    models_before = logged_models(study)
    for name in ("kept", "fresh"):
        code, out, err = export(study, capsys, "trial=1", f"out={tmp_path / name}", f"name={name}")
        assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert client.get_model_version_by_alias("kept", "champion").version == champion
    runs, versions = registry_state(study)
    assert versions == versions_before
    assert not client.search_registered_models("name = 'fresh'")  # made by the interrupted export: gone too
    assert logged_models(study) == models_before  # the logged model each registration made: gone too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first"]


def test_the_registered_files_are_the_ones_the_export_wrote(study, tmp_path, capsys, monkeypatch):
    """The version's fulu.files tag hashed what the artifact store gave back: code written there during the
    export was certified, and then served. The files read back must be the bytes the export wrote."""
    import mlflow

    def tamper(client, name, version):  # someone who can write to the artifact store, at the wrong moment
        stored = Path(client.get_model_version_download_uri(name, version).removeprefix("file://"))
        with open(stored / "pyfunc.py", "a") as f:
            f.write("\nraise SystemExit('ran')\n")

    registering_step_does(monkeypatch, tamper)
    runs_before, versions_before = registry_state(study)
    code, out, err = export(study, capsys, "trial=0", f"out={tmp_path / 'model'}", "name=tampered")
    assert code == 2, err
    assert err.count("\n") == 2 and "pyfunc.py: checksum mismatch" in err, err
    assert "registered as" not in out and list(tmp_path.iterdir()) == []
    assert registry_state(study)[1] == versions_before
    assert not mlflow.MlflowClient(study.tracking).search_registered_models("name = 'tampered'")


# An export in a child process that kills itself (SIGKILL: nothing of it runs any more) before or after one
# of its steps (and only where the step's arguments are those given).
KILLED_AT = {
    # writing the folder: a hidden partial folder is left, no run yet
    "writing": ("from fulu_nas.deploy import export as module; attribute = 'save_pyfunc'", "before", ""),
    # the run recorded, the folder not yet renamed into place: a hidden partial folder, the run RUNNING
    "recorded": ("import mlflow; module = mlflow; attribute = 'log_metrics'", "after", ""),
    # the folder renamed into place (its run recorded just before), nothing registered: the run RUNNING
    "renamed": ("import pathlib; module = pathlib.Path; attribute = 'rename'", "after", "model"),
    # registering: the folder, a version without its files' record and a logged model, the run RUNNING
    "registering": ("from fulu_nas.deploy import serve as module; attribute = 'record_registered_files'",
                    "before", ""),
    # the version registered to the end (its fingerprint tag), champion not moved to it: the run RUNNING
    "tagged": ("import mlflow; module = mlflow.MlflowClient; attribute = 'set_model_version_tag'", "after",
               "fulu.fingerprint"),
    # the alias moved: registered to the end, the run RUNNING
    "aliased": ("import mlflow; module = mlflow.MlflowClient; attribute = 'set_registered_model_alias'", "after",
                ""),
}
KILLED_EXPORT = """
import os, signal, sys
{where}
when, given = {when!r}, {given!r}
step = getattr(module, attribute)
def killed(*args, **kwargs):
    if when == "after":
        step(*args, **kwargs)
    if not given or any(given in (a, getattr(a, "name", None)) for a in args):
        os.kill(os.getpid(), signal.SIGKILL)
    if when == "before":
        return step(*args, **kwargs)
setattr(module, attribute, killed)
from fulu_nas.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("name", ["new", "existing"])
@pytest.mark.parametrize("when", list(KILLED_AT))
def test_the_next_export_undoes_what_a_killed_export_left(study, tmp_path, capsys, when, name):
    """kill -9 of an export (the out-of-memory killer, a lost node) left its MLflow run RUNNING, a version
    `fulu-nas serve` refuses with its logged model, the folder it never announced (a re-run of the same
    command then said 'out: ... is not empty') or a hidden partial one. The study's next export on this host
    undoes it, says so, and runs; a version that was registered to the end stays, with its folder."""
    import subprocess
    import sys

    import mlflow

    client = mlflow.MlflowClient(study.tracking)
    registered = f"killed-{when}-{name}"
    if name == "existing":
        assert export(study, capsys, "trial=0", f"out={tmp_path / 'first'}", f"name={registered}")[0] == 0
    runs_before, versions_before = registry_state(study)
    models_before = logged_models(study)
    out = tmp_path / "model"
    where, before_or_after, given = KILLED_AT[when]
    child = subprocess.run([sys.executable, "-c", KILLED_EXPORT.format(where=where, when=before_or_after,
                                                                      given=given), "export",
                            "study.name=tiny-clusters", f"hydra.run.dir={study.out}", "trial=1", f"out={out}",
                            f"name={registered}"], capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr

    # What it left, checked, so that the test shows the undoing.
    runs, versions = registry_state(study)
    left_open = [run for run, status in runs if status == "RUNNING"]
    killed_versions = [v for v in versions if v not in versions_before]
    partials = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    if when == "writing":
        assert not left_open and not killed_versions and not out.exists() and len(partials) == 1
    elif when in ("recorded", "renamed"):
        assert len(left_open) == 1 and not killed_versions and out.is_dir() == (when == "renamed")
        assert len(partials) == (when == "recorded") and logged_models(study) == models_before
    else:
        assert len(left_open) == 1 and len(killed_versions) == 1 and out.is_dir() and not partials
        assert len(logged_models(study)) == len(models_before) + 1
    champion_before = client.get_model_version_by_alias(registered, "champion").version \
        if name == "existing" or when == "aliased" else None
    finished = when in ("tagged", "aliased")  # its version registered to the end: it stays, with its folder

    # The same command again (where the killed export had finished its folder and version: another folder).
    again = tmp_path / "again" if finished else out
    code, printed, err = export(study, capsys, "trial=1", f"out={again}", f"name={registered}")
    assert code == 0, err
    undone = [line for line in printed.splitlines() if line.startswith("ended the MLflow run")]
    if when == "writing":
        assert undone == []
    else:
        [line] = undone
        assert line.startswith(f"ended the MLflow run {left_open[0]} of an export killed before it ended (process ")
        removed = {"recorded": f"removed its partial folder {partials[0] if partials else ''}",
                   "renamed": f"removed the folder {out}",
                   "registering": f"removed version {killed_versions[0][1] if killed_versions else ''} of "
                                  f"'{registered}' and the folder {out}"}
        assert line.endswith(f"of trial 1: {removed.get(when, 'nothing else to remove')}"), line
        run = client.get_run(left_open[0])
        assert run.info.status == "KILLED" and run.data.tags["fulu.reason"].startswith("export killed before")
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    runs, versions = registry_state(study)
    assert "RUNNING" not in dict(runs).values()
    new_versions = [v for v in versions if v not in versions_before]
    if finished:  # registered to the end: it stays, with its folder, beside the new version
        assert new_versions[0] == killed_versions[0] and len(new_versions) == 2 and out.is_dir()
        # "tagged": champion not moved to it (named the earlier version, or none), yet it stays
        assert (champion_before == killed_versions[0][1]) == (when == "aliased")
        assert len(logged_models(study)) == len(models_before) + 2
    else:
        assert len(new_versions) == 1 and len(logged_models(study)) == len(models_before) + 1
    if when in ("registering", "renamed", "recorded") and name == "new":  # its model went with its version
        assert new_versions == [(registered, 1)]
    assert client.get_model_version_by_alias(registered, "champion").version == new_versions[-1][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {"model", again.name} | ({"first"} if name == "existing" else set()))


def test_a_registered_model_made_by_a_killed_export_before_its_version_is_removed(study, tmp_path):
    """kill -9 between MLflow making the registered model and the export tagging it as its own left an empty
    registered model in the registry, which no undo removed."""
    import subprocess
    import sys

    import mlflow

    from fulu_nas.search.killed_exports import undo_killed_exports

    client = mlflow.MlflowClient(study.tracking)
    child = subprocess.run([sys.executable, "-c", KILLED_EXPORT.format(
        where="import mlflow; module = mlflow.MlflowClient; attribute = 'create_registered_model'", when="after",
        given=""), "export", "study.name=tiny-clusters", f"hydra.run.dir={study.out}", "trial=1",
        f"out={tmp_path / 'model'}", "name=made-then-killed"], capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr
    [made] = client.search_registered_models("name = 'made-then-killed'")
    assert not client.search_model_versions("name = 'made-then-killed'")
    study_object = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{study.out / 'optuna.db'}")
    [line] = undo_killed_exports(client, "tiny-clusters", study_object)
    out = tmp_path / "model"
    assert line.endswith(f"removed the empty registered model 'made-then-killed' and the folder {out}"), line
    assert not client.search_registered_models("name = 'made-then-killed'") and list(tmp_path.iterdir()) == []


def test_a_killed_export_into_an_empty_folder_given_leaves_it_empty_when_undone(study, tmp_path):
    """Ctrl-C leaves an empty folder given as out empty; the undo of a kill -9 removed it."""
    import subprocess
    import sys

    import mlflow

    from fulu_nas.search.killed_exports import undo_killed_exports

    out = tmp_path / "given"
    out.mkdir()
    where, before_or_after, given = KILLED_AT["registering"]
    child = subprocess.run([sys.executable, "-c", KILLED_EXPORT.format(where=where, when=before_or_after,
                                                                      given=given), "export",
                            "study.name=tiny-clusters", f"hydra.run.dir={study.out}", "trial=1", f"out={out}",
                            "name=given-empty"], capture_output=True, text=True, timeout=600)
    assert child.returncode == -9 and any(out.iterdir()), child.stderr
    study_object = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{study.out / 'optuna.db'}")
    [line] = undo_killed_exports(mlflow.MlflowClient(study.tracking), "tiny-clusters", study_object)
    assert line.endswith(f"removed version 1 of 'given-empty' and what the export wrote in {out}"), line
    assert out.is_dir() and not any(out.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["given"]


def test_an_export_run_at_work_or_of_another_host_and_a_changed_folder_are_left_alone(study, tmp_path, capsys):
    """Only a run whose writer is a process of this host that has ended is undone; and of its folder, only
    what the export wrote: a file changed or added since keeps the folder (the run is still ended)."""
    import shutil
    import socket
    import subprocess
    import sys

    import mlflow

    from fulu_nas.deploy.export import fingerprint
    from fulu_nas.search.killed_exports import undo_killed_exports

    client = mlflow.MlflowClient(study.tracking)
    assert export(study, capsys, "trial=0", f"out={tmp_path / 'written'}", "name=left-alone")[0] == 0
    experiment = client.get_experiment_by_name("tiny-clusters")
    parent = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{study.out / 'optuna.db'}") \
        .user_attrs["mlflow_parent_run_id"]
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = f"{socket.gethostname()}:{ended.stdout.strip()}"
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "written", changed)
    digest = fingerprint(changed)
    (changed / "notes.txt").write_text("mine")  # added since
    runs = {}
    for label, writer in (("at work", f"{socket.gethostname()}:{os.getpid()}"), ("other host", "elsewhere:1"),
                          ("changed folder", gone)):
        runs[label] = client.create_run(experiment.experiment_id, tags={
            "mlflow.parentRunId": parent, "fulu.kind": "export", "fulu.trial": "0", "fulu.worker": writer,
            "fulu.out": str(changed), "fulu.fingerprint": digest}).info.run_id
    study_object = optuna.load_study(study_name="tiny-clusters", storage=f"sqlite:///{study.out / 'optuna.db'}")
    [line] = undo_killed_exports(client, "tiny-clusters", study_object)
    assert line == (f"ended the MLflow run {runs['changed folder']} of an export killed before it ended (process "
                    f"{gone} gone) of trial 0: nothing else to remove")
    assert (changed / "notes.txt").is_file()
    assert {label: client.get_run(run).info.status for label, run in runs.items()} == {
        "at work": "RUNNING", "other host": "RUNNING", "changed folder": "KILLED"}
    for run in (runs["at work"], runs["other host"]):
        client.set_terminated(run, "FINISHED")


def test_only_the_partial_folders_of_ended_writers_are_removed(tmp_path):
    """A partial folder is its writer's (``.NAME.partial-HOST:PID-XXXXXXXX``): that of a running process, of
    another host, or any other hidden folder stays."""
    import socket
    import subprocess
    import sys

    from fulu_nas.deploy.export import remove_abandoned_partials

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    names = {"ended": f".model.partial-{host}:{ended.stdout.strip()}-abcd_123",
             "running": f".model.partial-{host}:{os.getpid()}-abcd_123",
             "other host": ".model.partial-elsewhere:1-abcd_123",
             "no writer": ".model.partial-abcd_123",
             "not ours": f".model.partial-{host}:{ended.stdout.strip()}-not-ours"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x")
    remove_abandoned_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "ended")


def test_the_searchs_pareto_table_is_in_the_order_pareto_i_counts(capsys, tmp_path):
    """The search's table (and summary.json) listed the front by trial number, and pareto:i counted by the first
    objective: pareto:0 exported the table's second row. Both follow the first objective now, and the table
    names each row's pareto:i."""
    from fulu_nas.search.report import print_summary, summarize

    front = constrained_study(["minimize", "minimize"], [([1.30, 1.0], 1.30, 1.0, 0.0), ([1.28, 2.0], 1.28, 2.0, 0.0),
                                                         ([1.20, 3.0], 1.20, 3.0, 0.0), ([1.40, 4.0], 1.40, 4.0, 0.0)])
    s = settings_for(["loss", "latency_ms"])
    s.study.n_trials, s.output_dir = 4, tmp_path
    s.ui_command = lambda: f"fulu-nas ui {tmp_path}"
    summary = summarize(front, s)
    numbers = [r["number"] for r in summary["pareto_front"]]
    assert numbers == [2, 1, 0] == [select_trial(front, s, f"pareto:{i}").number for i in range(3)]
    capsys.readouterr()
    print_summary(summary, s)
    rows = [line for line in capsys.readouterr().out.splitlines() if "pareto:" in line]
    cells = [[cell.strip() for cell in row.split("│")[1:3]] for row in rows]
    assert cells == [["trial=pareto:0", "2"], ["trial=pareto:1", "1"], ["trial=pareto:2", "0"]], rows


@pytest.mark.parametrize("while_", ["evaluating", "writing"])
def test_a_folder_that_appears_at_out_during_the_export_is_refused_and_left_alone(study, tmp_path, capsys,
                                                                                   monkeypatch, while_):
    """out is checked before the work and again before the folder is written; a folder another writer made in
    between (another export to the same out) refused the export, which then removed that folder and its
    files. One made while the folder is written is met at the rename (it was named a failed registration)."""
    from fulu_nas.deploy import export as deploy_export
    from fulu_nas.training import evaluate as evaluate_module

    target = tmp_path / "model"
    module, attribute = (evaluate_module, "evaluate") if while_ == "evaluating" else (deploy_export, "save_pyfunc")
    step = getattr(module, attribute)

    def meanwhile(*args, **kwargs):  # another writer, while this export works
        target.mkdir()
        (target / "theirs.txt").write_text("another writer's file")
        return step(*args, **kwargs)

    monkeypatch.setattr(module, attribute, meanwhile)
    runs_before, versions_before = registry_state(study)
    code, out, err = export(study, capsys, "trial=0", f"out={target}", "name=raced")
    assert code == 2 and f"out: {target} exists and is not empty" in err, err
    assert (target / "theirs.txt").read_text() == "another writer's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial folder either
    runs, versions = registry_state(study)
    assert versions == versions_before and all(status != "RUNNING" for _, status in runs)


@pytest.mark.parametrize("given", ["new folders", "an empty folder"])
def test_a_failed_write_to_the_artifact_store_is_one_message_and_leaves_no_folder(study, tmp_path, capsys,
                                                                                 monkeypatch, given):
    """An OSError from MLflow's artifact store (a disk full, a folder that cannot be written) was a traceback
    with exit code 1; the folders made for out (out=a/b/c made a/b) were left, and an empty folder given as
    out was made again with the umask's mode."""
    from fulu_nas.search import export_trial

    def full(*args, **kwargs):  # the artifact store failing: not the code under test
        raise OSError(28, "No space left on device", str(tmp_path / "mlartifacts" / "m-1"))

    monkeypatch.setattr(export_trial, "register_files", full)
    runs_before, versions_before = registry_state(study)
    if given == "an empty folder":
        target = tmp_path / "empty"
        target.mkdir()
        target.chmod(0o700)
    else:
        target = tmp_path / "a" / "b" / "c"
    code, out, err = export(study, capsys, "trial=0", f"out={target}", "name=disk-full")
    assert code == 2 and err.count("\n") == 2, err
    assert "tracking.uri: registering 'disk-full'" in err and "No space left on device" in err
    if given == "an empty folder":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"] and not any(target.iterdir())
        assert target.stat().st_mode & 0o777 == 0o700
    else:
        assert not any(tmp_path.iterdir())
    runs, versions = registry_state(study)
    assert [s for r, s in runs if r not in dict(runs_before)] == ["FAILED"] and versions == versions_before


@pytest.mark.parametrize("args, words", [
    (["trial=" + "1" * 5000], "trial: expected best, a trial number"),  # int(): a ValueError traceback
    (["retrain_factor=2"], "retrain_factor: only used with retrain=true"),  # ignored: the saved weights
    (["retrain=true", "retrain_factor=1_0"], "retrain_factor: expected a number > 0"),  # float() took 10
    (["retrain=true", "retrain_factor=1e1"], "retrain_factor: expected a number > 0"),
    (["trial=0", "out=" + "L" * 240], "out: the folder's name is 240 bytes long"),  # after the work: a traceback
    (["trial=0", "out=" + "L" * 300], "out: the folder's name is 300 bytes long"),  # at once: a traceback
])
def test_option_values_that_were_a_traceback_or_taken_wrongly_are_refused_before_any_work(study, tmp_path,
                                                                                          capsys, monkeypatch,
                                                                                          args, words):
    monkeypatch.chdir(tmp_path)
    before = registry_state(study)
    if not any(a.startswith("out=") for a in args):
        args = [*args, f"out={tmp_path / 'model'}"]
    refused_before_work(*export(study, capsys, *args), words)
    assert not any(tmp_path.iterdir()) and registry_state(study) == before


def test_out_starting_with_a_tilde_the_shell_left_is_in_the_home_folder(study, tmp_path, capsys, monkeypatch):
    """out='~/x' (quoted, or run by sh) wrote a folder named '~' in the current folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, out, err = export(study, capsys, "trial=0", "out=~/model", "name=tilde")
    assert code == 0, err
    assert (tmp_path / "home" / "model" / "checksums.json").is_file() and not (tmp_path / "~").exists()


def test_a_retraining_trains_on_the_searchs_device(study, monkeypatch):
    """retrain=true trained on trainer.device=auto whatever the search's: a study searched with
    trainer.device=cpu on a GPU host was retrained on the GPU (another model), and measured on the CPU."""
    from dataclasses import replace

    from fulu_nas.search import export_trial
    from fulu_nas.search.locate import load_study, locate_study, search_settings

    location = locate_study(["study.name=tiny-clusters", f"hydra.run.dir={study.out}"])
    searched = load_study(location)
    s = search_settings(location, searched)
    s = replace(s, train=replace(s.train, device="cpu"))
    devices = []

    def train(arch, settings, budget, *args):
        devices.append(budget.device)
        raise RuntimeError("trained enough")

    monkeypatch.setattr(export_trial, "train_architecture", train)
    with pytest.raises(RuntimeError, match="trained enough"):
        export_trial.trial_model(location, s, searched.trials[0], True, 1.0)
    assert devices == ["cpu"]

"""Several studies searched into one folder: the commands that read a study's configuration (confirm,
export, dashboard) take only the study's own, which the folder's search_config.json is only for the last
study searched there."""

from __future__ import annotations

import json

import pytest

from fulu_nas.cli import main
from fulu_nas.errors import FuluConfigError
from fulu_nas.search.locate import load_study, locate_study, search_settings

from .test_search_e2e import run_search


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Study `a`, searched into runs/x (1 trial)."""
    root = tmp_path_factory.mktemp("folders")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert run_search(root / "runs" / "x", "study.name=a", "study.n_trials=1") == 0
    return root


def settings_of(root, name, monkeypatch):
    monkeypatch.chdir(root)
    location = locate_study([f"study.name={name}", f"hydra.run.dir={root / 'runs' / 'x'}"])
    return search_settings(location, load_study(location))


def test_a_second_study_searched_into_the_folder_leaves_the_first_its_own_configuration(folder, monkeypatch):
    """A second study searched with the first's hydra.run.dir overwrote its search_config.json: a confirmation
    of the first then trained at the second's budget, and its export registered the first's trial under the
    second's name. Each study is now read with its own (the first's from its MLflow parent run)."""
    monkeypatch.chdir(folder)
    out = folder / "runs" / "x"
    steps = settings_of(folder, "a", monkeypatch).train.steps
    assert steps != 30
    try:
        assert run_search(out, "study.name=b", "study.n_trials=1", "trainer.steps=30") == 0
        a, b = settings_of(folder, "a", monkeypatch), settings_of(folder, "b", monkeypatch)
        assert (a.study.name, a.train.steps) == ("a", steps)
        assert (b.study.name, b.train.steps) == ("b", 30)
    finally:  # the folder's file back to study a's, for the module's other tests
        monkeypatch.chdir(folder)
        assert run_search(out, "study.name=a", "study.n_trials=1") == 0
    assert json.loads((out / "search_config.json").read_text())["config"]["study"]["name"] == "a"


def test_a_study_is_read_with_its_own_configuration_where_its_folder_holds_another(folder, monkeypatch, tmp_path):
    """A folder whose search_config.json names another study: the study's own configuration comes from its
    MLflow parent run."""
    path = folder / "runs" / "x" / "search_config.json"
    original = path.read_text()
    steps = json.loads(original)["config"]["trainer"]["steps"]
    try:
        data = json.loads(original)
        data["config"]["study"]["name"] = "b"
        path.write_text(json.dumps(data))
        settings = settings_of(folder, "a", monkeypatch)
        assert settings.study.name == "a" and settings.train.steps == steps
    finally:
        path.write_text(original)
    assert settings_of(folder, "a", monkeypatch).train.steps == steps


def test_another_studys_configuration_without_the_parent_runs_copy_is_refused(folder, monkeypatch, tmp_path, capsys):
    """Where the MLflow parent run's copy cannot be read either, the commands refuse (exit 2) rather than
    use another study's configuration."""
    import optuna

    from fulu_nas.search.tracking import PARENT_RUN_ATTR

    path = folder / "runs" / "x" / "search_config.json"
    original = path.read_text()
    data = json.loads(original)
    data["config"]["study"]["name"] = "b"
    storage = f"sqlite:///{folder / 'runs' / 'x' / 'optuna.db'}"
    study = optuna.load_study(study_name="a", storage=storage)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    try:
        path.write_text(json.dumps(data))
        study.set_user_attr(PARENT_RUN_ATTR, None)
        with pytest.raises(FuluConfigError, match="search_config.json is the configuration of study 'b', not of "
                                                  "study 'a'"):
            settings_of(folder, "a", monkeypatch)
        assert main(["export", "study.name=a", f"hydra.run.dir={folder / 'runs' / 'x'}",
                     f"out={tmp_path / 'e'}"]) == 2
        assert "is the configuration of study 'b'" in capsys.readouterr().err
        assert not (tmp_path / "e").exists()
    finally:
        path.write_text(original)
        study.set_user_attr(PARENT_RUN_ATTR, parent)


def test_a_space_read_back_with_its_keys_sorted_is_in_when_order():
    """The MLflow parent run's copy of a search's configuration was written with sorted keys, which put
    hierarchy_depth before the router its when names: the default space was refused when read from there."""
    from fulu_nas.search.locate import params_in_when_order
    from fulu_nas.search.space import parse_space

    space = {"params": {"hierarchy_depth": {"type": "int", "low": 1, "high": 2, "when": {"router": "hierarchical"}},
                        "num_experts": {"type": "categorical", "choices": [4, 8]},
                        "router": {"type": "categorical", "choices": ["topk", "hierarchical"]},
                        "top_k": {"type": "categorical", "choices": [1, 2], "when": {"router": "topk"}}}}
    with pytest.raises(FuluConfigError, match="hierarchy_depth.when.router"):
        parse_space(space)
    ordered = params_in_when_order({"search_space": space})["search_space"]
    assert list(ordered["params"]) == ["router", "hierarchy_depth", "num_experts", "top_k"]
    assert [p.name for p in parse_space(ordered).params] == ["router", "hierarchy_depth", "num_experts", "top_k"]


def test_a_configuration_of_the_same_name_with_other_settings_is_not_taken(folder, monkeypatch, tmp_path, capsys):
    """Two studies of one name searched into one folder (each in its own storage), or a file edited since: the
    folder's search_config.json names the study, and was taken with its budget and data seed. The study's
    fingerprint of its settings is checked: the parent run's copy is read instead, or the command refuses."""
    import optuna

    from fulu_nas.search.tracking import PARENT_RUN_ATTR

    path = folder / "runs" / "x" / "search_config.json"
    original = path.read_text()
    data = json.loads(original)
    steps, seed = data["config"]["trainer"]["steps"], data["config"]["task"]["data_seed"]
    data["config"]["trainer"]["steps"] = 30
    data["config"]["task"]["data_seed"] = seed + 7
    storage = f"sqlite:///{folder / 'runs' / 'x' / 'optuna.db'}"
    study = optuna.load_study(study_name="a", storage=storage)
    parent = study.user_attrs[PARENT_RUN_ATTR]
    try:
        path.write_text(json.dumps(data))
        settings = settings_of(folder, "a", monkeypatch)
        assert settings.train.steps == steps and settings.task_params["data_seed"] == seed
        study.set_user_attr(PARENT_RUN_ATTR, None)
        with pytest.raises(FuluConfigError) as refused:
            settings_of(folder, "a", monkeypatch)
        assert refused.value.problems == [
            f"study.name: {path} is not the configuration study 'a' was searched with: it has another task and "
            "another trainer (two studies searched in one folder? give each its own hydra.run.dir)"]
        assert main(["export", "study.name=a", f"hydra.run.dir={folder / 'runs' / 'x'}",
                     f"out={tmp_path / 'e'}"]) == 2
        assert "is not the configuration study 'a' was searched with" in capsys.readouterr().err
        assert not (tmp_path / "e").exists()
    finally:
        path.write_text(original)
        study.set_user_attr(PARENT_RUN_ATTR, parent)
    assert settings_of(folder, "a", monkeypatch).train.steps == steps


def test_a_moved_study_folder_is_named_as_moved_and_not_made_again(folder, tmp_path, monkeypatch, capsys):
    """MLflow's runs keep the absolute path of their artifacts: from a study folder moved since its search,
    export said the trial "has no saved weights (was tracking.log_weights false, or did their upload fail?)",
    the dashboard logged its page into the old path, making that folder again, and a resume trained its
    trials with their weights going there."""
    import shutil

    original = folder / "runs" / "x"
    moved = tmp_path / "moved"
    shutil.copytree(original, moved)
    away = folder / "runs" / "x-away"
    original.rename(away)  # as moved: the old path no longer exists
    try:
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        assert main(["export", "study.name=a", f"hydra.run.dir={moved}", f"out={tmp_path / 'e'}"]) == 2
        err = capsys.readouterr().err
        assert f"weights are recorded in {original}/mlartifacts/" in err and "which does not exist: was the study's " \
            "folder moved from there?" in err, err
        assert not (tmp_path / "e").exists()
        assert main(["dashboard", "study.name=a", f"hydra.run.dir={moved}"]) == 0
        printed = capsys.readouterr()
        assert (moved / "dashboard.html").is_file() and "not logged to MLflow: run " in printed.err, printed.err
        assert not original.exists()  # the dashboard's upload made the old folder again
        # the best trial's expert load and routing, read from the moved folder ("ensure that the path is correct")
        page = (moved / "dashboard.html").read_text()
        for panel in ("expert_load", "routing_matrix"):
            section = page.split(f'<section id="panel-{panel}"', 1)[1].split("</section>", 1)[0]
            assert "could not read" not in section and 'class="plotly-graph-div"' in section, section[:600]
        # a resume there would put its trials' weights in the old folder, where no export finds them
        assert run_search(moved, "study.name=a", "study.n_trials=2") == 2
        err = capsys.readouterr().err
        assert f"hydra.run.dir: study 'a' keeps its MLflow artifacts in {original}/mlartifacts" in err, err
        assert not original.exists()
    finally:
        shutil.rmtree(original, ignore_errors=True)
        away.rename(original)

"""One study per folder: a search refuses a folder that holds another study's search, and the commands
that read a study's configuration (confirm, export, dashboard) take only the study's own."""

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


def test_a_second_study_is_not_searched_into_the_first_ones_folder(folder, monkeypatch, capsys):
    """A second study searched with the first's hydra.run.dir overwrote its search_config.json, summary and
    .hydra/: a confirmation of the first then trained at the second's budget, and its export registered the
    first's trial under the second's name."""
    monkeypatch.chdir(folder)
    out = folder / "runs" / "x"
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".db"}
    assert run_search(out, "study.name=b", "study.n_trials=1", "trainer.steps=30") == 2
    err = capsys.readouterr().err
    assert f"- hydra.run.dir: {out} is the folder of study 'a'" in err and err.count("  - ") == 1, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.suffix != ".db"} == before
    # the same study resumes there as before
    assert run_search(out, "study.name=a", "study.n_trials=1") == 0


def test_a_study_is_read_with_its_own_configuration_where_its_folder_holds_another(folder, monkeypatch, tmp_path):
    """A folder whose search_config.json is another study's (left by a second search before the refusal
    above, or edited): the study's own configuration comes from its MLflow parent run."""
    path = folder / "runs" / "x" / "search_config.json"
    original = path.read_text()
    steps = json.loads(original)["config"]["trainer"]["steps"]
    try:
        for change in ({"study": "b"}, {"steps": steps // 2}):
            data = json.loads(original)
            if "study" in change:
                data["config"]["study"]["name"] = change["study"]
            else:
                data["config"]["trainer"]["steps"] = change["steps"]
            path.write_text(json.dumps(data))
            settings = settings_of(folder, "a", monkeypatch)
            assert settings.study.name == "a" and settings.train.steps == steps, change
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

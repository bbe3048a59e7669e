"""``fulu-nas search`` on bad input: exit code 2, one message naming the key, nothing written.
And the Hydra conveniences (``--cfg job``, ``--help``) that must not run a study."""

from __future__ import annotations

import pytest
import yaml

from fulu_nas.cli import main

BAD_SPACE = {"name": "mine", "params": {"num_experts": {"type": "int", "low": 16, "high": 4}}}

# (overrides, text the message must contain)
BAD = [
    (["search_space=nonexistent"], "search_space"),
    (["task=nonexistent"], "task"),
    (["study.sampler=annealing"], "study.sampler"),
    (["study.objectives=[loss,latency_ms]"], "study.pruner"),
    (["study.objectives=[loss,speed]", "study.pruner=none"], "study.objectives"),
    (["study.pruner=median", "study.objectives=[latency_ms]"], "study.pruner"),
    (["study.n_trials=0"], "study.n_trials"),
    (["+study.n_trial=5"], "study.n_trial"),
    (["study.storage=oracle://host/db"], "study.storage"),
    (["study.storage=sqlite:////nonexistent/dir/optuna.db"], "study.storage"),
    (["study.storage=journal:///nonexistent/dir/journal.log"], "study.storage"),
    (["study.constraints={latency:1.0}"], "study.constraints.latency"),
    (["tracking.uri=/tmp/mlruns"], "tracking.uri"),
    (["trainer.lr=-1"], "trainer.lr"),
    (["trainer.cost_shapes=[[1]]"], "trainer.cost_shapes"),
    (["trainer.device=tpu"], "trainer.device"),
    (["task=textlm", "task.path=/nonexistent/corpus"], "/nonexistent/corpus"),
    (["study.sampler=grid", "search_space=default", "+search_space.params.router_jitter={type:float,low:0,high:1}",
      "+search_space.reference.router_jitter=0.0"],
     "params.router_jitter"),
    (["search_space.params.top_k.high=0"], "search_space.params.top_k"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[k for _, k in BAD])
def test_bad_input_exits_2_naming_the_key_and_writes_nothing(overrides, key, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", *overrides]) == 2
    err = capsys.readouterr().err
    assert key in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_users_own_space_outside_the_repo_is_validated_the_same_way(tmp_path, monkeypatch, capsys):
    spaces = tmp_path / "my_conf" / "search_space"
    spaces.mkdir(parents=True)
    (spaces / "mine.yaml").write_text(yaml.safe_dump(BAD_SPACE))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["search", "--config-dir", str(tmp_path / "my_conf"), "search_space=mine"]) == 2
    assert "search_space.params.num_experts: low (16) > high (4)" in capsys.readouterr().err
    assert list(work.iterdir()) == []


def test_storage_passwords_stay_out_of_messages(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "study.storage=postgresql://user:hunter2@127.0.0.1:1/db"]) == 2
    err = capsys.readouterr().err
    assert "study.storage" in err and "hunter2" not in err and "***" in err


def test_cfg_job_prints_the_composed_config_without_running(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["search", "--cfg", "job", "--resolve", "search_space=routers", "task=clusters"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["search_space"]["name"] == "routers" and cfg["task"]["name"] == "clusters"
    assert cfg["study"]["name"] == "routers-clusters"
    assert not (tmp_path / "outputs").exists()


def test_help_lists_commands_and_hydra_groups(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("search", "ui", "bench"):
        assert f"  {command} " in out
    assert main(["search", "--help"]) == 0
    out = capsys.readouterr().out
    groups = ("search_space: default, nasbench, routers, scaling, tiny", "study:", "task:", "trainer:", "tracking:")
    for group in groups:
        assert group in out, out


def test_ui_refuses_a_folder_without_a_tracking_database(tmp_path, capsys):
    assert main(["ui", str(tmp_path)]) == 2
    assert "no MLflow database" in capsys.readouterr().err

"""What the search and the confirmation print at the end: the tables whole on an 80-column terminal (no
value or architecture cut to an ellipsis), and each line of prose on one line (a command in it is copied
whole from a log)."""

from __future__ import annotations

import io
import re
import shlex

from rich.console import Console

from fulu_nas.search.app import compose_config
from fulu_nas.search.confirm_summary import print_confirmation
from fulu_nas.search.report import format_value, print_summary
from fulu_nas.search.settings import load_settings

METRICS = {"loss": 1.2866661, "metric": 0.40104, "routing_accuracy": 0.2, "load_balance": 0.99993,
           "latency_ms": 0.41273, "latency_ratio": 0.92074, "active_params": 11812.0}
PARAMS = {"router": "expert_choice", "num_experts": 16, "top_k": 2, "expert_ffn_size": 128,
          "capacity_factor": 1.25, "router_jitter": 0.01}


def settings(tmp_path, *overrides):
    out = tmp_path / "a-results-folder-with-a-rather-long-name" / "outputs" / "tiny-clusters"
    cfg, _ = compose_config(["+experiment=tiny", f"hydra.run.dir={out}", *overrides])
    return load_settings(cfg, out, will_train=False)


def row(number: int, loss: float, reference=False, **params) -> dict:
    return {"number": number, "values": [loss], "params": {**PARAMS, **params},
            "metrics": {**METRICS, "loss": loss, "latency_ms": METRICS["latency_ms"] + number / 1000},
            "reference": reference, "feasible": True, "violated_constraints": [], "cached_from": None}


def search_summary(**extra) -> dict:
    best, reference = row(2, 1.2866661), row(0, 1.309049, reference=True, router="topk", num_experts=4)
    return {"study": "tiny-clusters", "objectives": ["loss"], "directions": ["minimize"], "n_trials_requested": 8,
            "n_finished": 8, "n_complete": 7, "n_pruned": 1, "n_infeasible": 0, "n_failed": 0, "n_reused": 1,
            "reference": reference, "best_trial": 2, "best_values": best["values"], "best": best,
            "beats_reference": True, "improvement_over_reference": 0.017, "best_is_reference": False, **extra}


def table_fits(lines: list[str]) -> bool:
    """The table's lines (prose is one line however long: the terminal wraps it) are within 80 columns."""
    return max(len(line) for line in lines if line[:1] in "┏┃┡│├└┌") <= 80


def printed(width: int, show, *args) -> str:
    console = Console(width=width, file=io.StringIO())
    show(*args, console=console)
    return console.file.getvalue()


def test_the_searchs_table_is_whole_at_80_columns(tmp_path):
    """At 80 columns rich cut the best trial's values and its architecture to ellipses ("0.92…", "rout…")."""
    s = settings(tmp_path)
    summary = search_summary()
    text = printed(80, print_summary, summary, s)
    lines = text.splitlines()
    assert "…" not in text and table_fits(lines), text
    for r in (summary["best"], summary["reference"]):
        for v in [*r["values"], *r["metrics"].values()]:
            assert format_value(v) in text, (v, text)
    for k in PARAMS:  # a row a parameter: its name, the best trial's value, the reference's
        best, ref = format_value(summary["best"]["params"][k]), format_value(summary["reference"]["params"][k])
        assert any(re.search(rf"\b{k}\b.*\b{re.escape(best)}\b.*\b{re.escape(ref)}\b", line) for line in lines), text
    # wide enough, one row a trial, its architecture in one column
    wide = printed(400, print_summary, summary, s)
    assert "router=expert_choice, num_experts=16, top_k=2, expert_ffn_size=128" in wide, wide


def test_a_pareto_front_is_whole_at_80_columns(tmp_path):
    s = settings(tmp_path, "study=multi_objective")
    front = [row(n, loss, num_experts=e) for n, loss, e in ((3, 1.25, 8), (5, 1.27, 4), (1, 1.3, 2))]
    for r, latency in zip(front, (0.5, 0.4, 0.3), strict=True):
        r["values"] = [r["values"][0], latency]
    summary = {**search_summary(), "objectives": ["loss", "latency_ms"], "directions": ["minimize", "minimize"],
               "pareto_front": front}
    summary["reference"]["values"] = [1.309049, 0.35]
    for key in ("best", "best_trial", "beats_reference", "improvement_over_reference", "best_is_reference"):
        summary.pop(key)
    for width in (80, 160):  # 160: a log's width, where the row layout measured as fitting and was then cut
        text = printed(width, print_summary, summary, s)
        assert "…" not in text and max(len(line) for line in text.splitlines()
                                        if line[:1] in "┏┃┡│├└┌") <= width, text
    text = printed(80, print_summary, summary, s)
    for i, r in enumerate(front):
        assert f"pareto:{i}" in text and "export as" in text, text  # a row "export as trial=", or trial=pareto:i
        shown = [v for k, v in r["metrics"].items() if k not in summary["objectives"]]  # the objectives: values
        for v in [*r["values"], *shown, *r["params"].values()]:
            assert format_value(v) in text, (v, text)


def confirmation() -> dict:
    arch = ", ".join(f"{k}={v}" for k, v in PARAMS.items())
    rows = [(0, True, 3, 1, [1.277, 0.032], 1.309, "reference"),
            (2, False, 1, 2, [1.278, 0.027], 1.287, "not distinguishable from the reference (p=0.511)"),
            (1, False, 2, 3, [1.296, 0.0079], 1.304, "not distinguishable from the reference (p=0.725)")]
    return {"study": "tiny-clusters", "objectives": ["loss"], "directions": ["minimize"], "steps": 120,
            "budget_factor": 2, "search_steps": 60, "seeds": [1, 2], "failed_runs": [], "missing_runs": [],
            "reference": 0, "kendall_tau": {"tau": -0.333, "p_value": 1.0, "n": 3}, "winner": None,
            "architectures": [
                {"trial": t, "reference": ref, "search_rank": sr, "confirmed_rank": cr, "mean": [m], "sd": [sd],
                 "n": 2, "search_values": [sv], "params": arch.replace("16", str(16 + t)),
                 "vs_reference": None if ref else [{"verdict": verdict}]}
                for t, ref, sr, cr, (m, sd), sv, verdict in rows]}


def test_the_confirmations_table_is_whole_at_80_columns(tmp_path):
    summary = confirmation()
    text = printed(80, print_confirmation, summary, tmp_path / "confirmation.json")
    lines = text.splitlines()
    assert "…" not in text and table_fits(lines), text
    words = " ".join(text.split())
    for a in summary["architectures"]:
        assert f"trial {a['trial']}: {a['params']}" in lines, text  # the architecture whole, on its line
        for v in (a["mean"][0], a["search_values"][0], a["search_rank"], a["confirmed_rank"]):
            assert format_value(v) in text, (v, text)
        assert a["reference"] or a["vs_reference"][0]["verdict"].split("(")[1] in words, text
    wide = printed(400, print_confirmation, summary, tmp_path / "confirmation.json")
    assert summary["architectures"][0]["params"] in wide and "trial 0: " not in wide, wide


def test_a_line_with_a_command_is_printed_on_one_line(tmp_path, capsys):
    """In a log (160 columns) the verdict was wrapped in the middle of its `fulu-nas confirm ...`
    command, and at 80 columns the `fulu-nas ui PATH` hint was split."""
    s = settings(tmp_path)
    for width in (80, 160):
        lines = printed(width, print_summary, search_summary(), s).splitlines()
        # the change as it is ("+1.7%" read as a worse loss), and what the advised command trains
        assert any(line.startswith("best trial 2 beats the reference architecture on loss (1.7% lower) in one run at ")
                   and line.endswith(f"; fulu-nas confirm study.name=tiny-clusters hydra.run.dir={s.output_dir} "
                                     f"trains the best 8 architectures (at most) and the reference again for 4 x "
                                     f"{s.train.steps} steps with 3 seeds")
                   for line in lines), lines
        assert f"results: {s.output_dir}  |  MLflow: fulu-nas ui {s.output_dir}" in lines, lines
    print_summary(search_summary(), s)  # not a terminal: a log's 160 columns
    out = capsys.readouterr().out.splitlines()
    assert any(line.endswith(f"again for 4 x {s.train.steps} steps with 3 seeds") for line in out), out
    assert f"results: {s.output_dir}  |  MLflow: fulu-nas ui {s.output_dir}" in out, out
    summary = confirmation()
    summary["winner"] = {"trial": 0, "arch_hash": "h", "search_rank": 3, "mean": [1.277], "sd": [0.032], "n": 2}
    lines = printed(80, print_confirmation, summary, tmp_path / "confirmation.json").splitlines()
    assert any(line.startswith("winner: ") and line.endswith("`fulu-nas export` with trial=best takes it")
               for line in lines), lines


def test_a_multirun_prints_no_hydra_lines(tmp_path):
    """``--multirun`` printed Hydra's "[HYDRA] Launching 1 jobs locally" and "#0 : ..." lines on stdout."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "fulu_nas", "search", "--multirun", "+experiment=tiny",
                           "study.n_trials=1", "trainer.steps=5"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "[HYDRA]" not in done.stdout + done.stderr and "Launching" not in done.stdout, done.stdout
    assert "Best trial" in done.stdout, done.stdout


def test_the_command_list_is_in_two_columns(capsys):
    """``dashboard`` overflowed the names' column: its text started a column later than the others'."""
    from fulu_nas.cli import COMMANDS, main

    assert main(["--help"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] in ([c] for c in COMMANDS)]
    assert len(lines) == len(COMMANDS)
    starts = {line.index(COMMANDS[line.split()[0]]) for line in lines}
    assert len(starts) == 1, lines


def test_the_bar_counts_a_pareto_front_of_one_trial_in_the_singular(tmp_path):
    import optuna

    from fulu_nas.search.study import TrialProgress

    s = settings(tmp_path, "study=multi_objective")
    study = optuna.create_study(directions=list(s.study.directions))
    dist = {"a": optuna.distributions.IntDistribution(0, 9)}
    study.add_trial(optuna.trial.create_trial(values=[1.0, 1.0], params={"a": 0}, distributions=dist))
    assert TrialProgress(s, study, enabled=False).best == "Pareto front: 1 trial"
    study.add_trial(optuna.trial.create_trial(values=[0.5, 2.0], params={"a": 1}, distributions=dist))
    assert TrialProgress(s, study, enabled=False).best == "Pareto front: 2 trials"


def test_a_resume_with_nothing_to_do_says_so(tmp_path):
    """The same command again on a finished study printed only the full bar and the table."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "fulu_nas", "search", "+experiment=tiny", "study.n_trials=1", "trainer.steps=5"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0 and "already has" not in first.stdout, first.stderr
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert ("study tiny-clusters already has 1 finished trial of the 1 requested: nothing to train; study.n_trials=M "
            "(more than 1) extends it") in again.stdout.splitlines(), again.stdout


def test_the_help_texts_are_plain_text(capsys):
    """export, serve and ui --help printed their docstrings' Sphinx markup (``x``, :mod:`...`, :func:`...`),
    and export --help had no usage line."""
    from fulu_nas.cli import main

    for command in ("export", "serve", "ui", "dashboard"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: fulu-nas " + command), out
        assert "``" not in out and not re.search(r":(mod|func|class|meth|attr):`", out), out


def test_an_empty_option_is_refused(tmp_path, monkeypatch, capsys):
    """export name=, dashboard layout= (an unset shell variable, say) and every other option of the commands
    that read a study fell back to the defaults silently."""
    from fulu_nas.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, named in ((["export", "study.name=tiny-clusters", "name="], "name: empty"),
                        (["dashboard", "study.name=tiny-clusters", "layout="], "layout: empty"),
                        (["export", "study.name=tiny-clusters", "trial="], "trial: empty"),
                        (["export", "study.name=tiny-clusters", "out="], "out: empty"),
                        (["dashboard", "study.name=tiny-clusters", "out="], "out: empty"),
                        (["confirm", "study.name=tiny-clusters", "n_workers="], "n_workers: empty")):
        assert main(argv) == 2
        printed = capsys.readouterr()
        assert printed.out == "" and named in printed.err and printed.err.count("\n") == 2, printed.err
        assert list(tmp_path.iterdir()) == []


def test_with_confirm_enabled_the_summary_does_not_advise_fulu_nas_confirm(tmp_path):
    """With study.confirm.enabled the summary advised `fulu-nas confirm ...` right before the confirmation ran."""
    s = settings(tmp_path, "study.confirm.enabled=true")
    text = printed(160, print_summary, search_summary(), s)
    assert "fulu-nas confirm" not in text and "the confirmation (study.confirm.enabled) trains the best 8" in text, text
    # "with several seeds", where it trained one
    one = settings(tmp_path, "study.confirm.enabled=true", "study.confirm.seeds=1", "study.confirm.top_k=1")
    assert (f"trains the best 1 architecture (at most) and the reference again for 4 x {one.train.steps} steps with "
            "1 seed\n") in printed(400, print_summary, search_summary(), one)


def test_the_confirm_advice_locates_the_study_from_where_it_is_given(tmp_path, monkeypatch):
    """It said `fulu-nas confirm study.name=NAME` alone, which looks in outputs/NAME: a study in another folder
    (a multirun's job folder), or with its own storage or tracking database, was not found there."""
    monkeypatch.chdir(tmp_path)
    from fulu_nas.search.app import compose_config

    def advice(*overrides):
        cfg, out = compose_config(["+experiment=tiny", *overrides])
        text = printed(400, print_summary, search_summary(), load_settings(cfg, out, will_train=False))
        return text.partition("; fulu-nas confirm ")[2].partition(" trains the best")[0]

    assert advice() == "study.name=tiny-clusters"  # the default folder, outputs/tiny-clusters
    assert advice("hydra.run.dir=multirun/x/1") == f"study.name=tiny-clusters hydra.run.dir={tmp_path}/multirun/x/1"
    assert advice("study.storage=sqlite:///s.db", "tracking.uri=sqlite:///t.db") == (
        "study.name=tiny-clusters study.storage=sqlite:///s.db tracking.uri=sqlite:///t.db")
    # Copied as printed, it must work: a password masked as *** failed to connect (it is left out: PostgreSQL's
    # client reads PGPASSWORD or ~/.pgpass), and a folder with a space was cut in two by the shell.
    assert advice("study.storage=postgresql://fulu:s3cret@127.0.0.1:5432/optuna", "hydra.run.dir=sp ace/x") == (
        f"study.name=tiny-clusters 'hydra.run.dir={tmp_path}/sp ace/x' study.storage=postgresql://fulu@127.0.0.1:5432/optuna")
    # and quoted for Hydra as well as for the shell: a URL's query (`?timeout=30`) unquoted is no override Hydra
    # reads ("mismatched input '='")
    printed_advice = advice("study.storage='sqlite:///s.db?timeout=30'", "tracking.uri='sqlite:///t.db?timeout=60'")
    assert printed_advice == ("study.name=tiny-clusters 'study.storage=\"sqlite:///s.db?timeout=30\"' "
                              "'tracking.uri=\"sqlite:///t.db?timeout=60\"'")
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = [OverridesParser.create().parse_override(o) for o in shlex.split(printed_advice)]
    assert [(o.key_or_group, o.value()) for o in parsed] == [
        ("study.name", "tiny-clusters"), ("study.storage", "sqlite:///s.db?timeout=30"),
        ("tracking.uri", "sqlite:///t.db?timeout=60")]


def test_the_mlflow_ui_advice_opens_the_tracking_database_the_study_used(tmp_path, monkeypatch):
    """`fulu-nas ui <output folder>` opens the folder's mlflow.db: with tracking.uri set it refused ("no MLflow
    database at ..."), though it was the folder the search printed."""
    monkeypatch.chdir(tmp_path)
    from fulu_nas.search.app import compose_config

    def ui(*overrides):
        cfg, out = compose_config(["+experiment=tiny", *overrides])
        text = printed(400, print_summary, search_summary(), load_settings(cfg, out, will_train=False))
        return text.partition("MLflow: ")[2].splitlines()[0]

    assert ui() == "fulu-nas ui outputs/tiny-clusters"
    assert ui("tracking.uri=postgresql://fulu:s3cret@127.0.0.1:5432/mlflow") == (
        "fulu-nas ui --tracking-uri postgresql://fulu@127.0.0.1:5432/mlflow")
    # a tracking server serves its own UI (`mlflow ui` took its address for a store and failed with a traceback)
    assert ui("tracking.uri=http://alice:s3cret@mlflow.example:5000") == "http://mlflow.example:5000"
    # MLflow reads a scheme in any case: an upper-case one is a server too
    assert ui("tracking.uri=HTTPS://mlflow.example:5000") == "https://mlflow.example:5000"


def test_a_tracking_server_keeps_its_own_artifacts_whatever_the_schemes_case(tmp_path, monkeypatch):
    """A study tracked on `HTTP://host` made its MLflow experiment with an artifact folder on this machine
    (a path the server cannot reach), as for a tracking database: the scheme was compared in lower case."""
    monkeypatch.chdir(tmp_path)
    from fulu_nas.search.app import compose_config

    def artifact_location(uri):
        cfg, out = compose_config(["+experiment=tiny", f"tracking.uri={uri}"])
        return load_settings(cfg, out, will_train=False).artifact_location

    assert artifact_location("http://mlflow.example:5000") is None
    assert artifact_location("HTTP://mlflow.example:5000") is None
    assert artifact_location("sqlite:///t.db").startswith("file://")


def test_large_and_small_values_are_printed_in_plain_digits():
    """A throughput of 12,345.6 tok/s printed as "1.235e+04", an active-parameter count of 1,181,200 as
    "1.181e+06": figures a reader compares by eye. Large values are whole numbers with thousands
    separators; values between 1 and 10,000 keep 4 significant digits; tiny ones keep the exponent (a
    p-value of 3e-07 is not 0)."""
    assert format_value(12345.6) == "12,346"
    assert format_value(1181200.0) == "1,181,200"
    assert format_value(-25000.4) == "-25,000"
    assert format_value(1234.56) == "1235"
    assert format_value(0.92074) == "0.9207"
    assert format_value(3e-07) == "3e-07"
    assert format_value(0.0) == "0"
    assert format_value(float("nan")) == "nan" and format_value(float("inf")) == "inf"
    assert format_value(11812) == "11812" and format_value(None) == "-"


def test_an_interrupted_multirun_job_says_how_to_resume_its_sweep(tmp_path):
    """"run the same command to resume" started a new sweep in a new timestamped folder, training every job
    again: the same command resumes the sweep with its folder given."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from fulu_nas.search.app import CONF_DIR
    from fulu_nas.search.study import _in_this_sweep

    assert _in_this_sweep() == ""  # no Hydra job (the API), or a single run:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for mode, said in (("RUN", ""), ("MULTIRUN", f" with hydra.sweep.dir={tmp_path / 'sweep'}")):
            cfg = compose("config", overrides=["+experiment=tiny", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.mode = mode
            HydraConfig.instance().set_config(cfg)
            try:
                assert _in_this_sweep() == said
            finally:
                HydraConfig.instance().cfg = None

"""``fulu-nas dashboard``: layouts are validated (exit 2, nothing written); the page of a tiny
search is self-contained, has every panel, is logged on the study's parent MLflow run, and renders
in headless Chromium with no JavaScript errors; a study with no complete trial and a
multi-objective study (Pareto panel) render too."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest

from fulu_nas.cli import main
from fulu_nas.dashboard.context import describe_arch
from fulu_nas.dashboard.layout import available_layouts, load_layout
from fulu_nas.dashboard.panels import PANELS
from fulu_nas.errors import FuluConfigError

from .helpers import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
DEFAULT_PANELS = [p.name for p in load_layout("default").panels]


# ---------------------------------------------------------------- layouts (fast)


def test_every_shipped_layout_is_valid():
    assert "default" in available_layouts()
    for name in available_layouts():
        layout = load_layout(name)
        assert layout.panels and all(p.name in PANELS for p in layout.panels)
    assert {"objective", "importances", "parallel", "expert_load", "routing_matrix", "top_trials"} <= set(
        DEFAULT_PANELS)


def test_layout_problems_are_all_listed(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nextra: 1\npanels: [objective, bogus, {panel: top_trials, rows: 0, colour: red}]\n")
    with pytest.raises(FuluConfigError) as e:
        load_layout(str(bad))
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 4
    assert "'extra'" in text and "unknown panel 'bogus'" in text and "'colour'" in text and "rows=0" in text
    with pytest.raises(FuluConfigError, match="no layout 'nope'.*default"):
        load_layout("nope")
    bad.write_text("title: x\npanels: [objective]\npanels: [top_trials]\n")  # PyYAML kept the last, silently
    with pytest.raises(FuluConfigError, match="bad.yaml is not valid YAML: the key 'panels' given a second time "
                                              "at line 3"):
        load_layout(str(bad))
    bad.write_text("title: x\npanels: [{<<: {panel: top_trials, rows: 2}, rows: 3}]\n")  # a merge's key set again
    [panel] = load_layout(str(bad)).panels
    assert panel.name == "top_trials" and panel.options == {"rows": 3}, panel
    bad.write_bytes('title: "R\xe9sultats"\npanels: [objective]\n'.encode("latin-1"))  # was a traceback
    with pytest.raises(FuluConfigError, match="bad.yaml is not UTF-8 text"):
        load_layout(str(bad))


def test_bad_input_exits_2_before_anything_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", "study.name=x", "layout=nope"]) == 2
    assert "no layout 'nope'" in capsys.readouterr().err
    assert main(["dashboard"]) == 2
    assert "study.name" in capsys.readouterr().err
    assert main(["dashboard", "study.name=missing"]) == 2
    assert "no study database" in capsys.readouterr().err
    # an option Hydra would drop: the default layout was drawn and written in its place
    assert main(["dashboard", "study.name=missing", "--layout=compact"]) == 2
    assert "--layout=compact: unknown option" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(["dashboard", "--help"]) == 0


def test_a_wrong_study_storage_is_refused_and_left_as_it_was(tmp_path, monkeypatch, capsys):
    """A command that reads a study must not write: Optuna opening the MLflow database beside the study
    created its tables there (then failed with a traceback), a journal URL created its file."""
    import sqlite3

    monkeypatch.chdir(tmp_path)
    tracking = tmp_path / "mlflow.db"
    with sqlite3.connect(tracking) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER)")
    before = tracking.read_bytes()
    run = ["dashboard", "study.name=x", f"hydra.run.dir={tmp_path}"]
    cases = [(f"sqlite:///{tracking}", "is an MLflow tracking database"),
             (f"journal:///{tmp_path}/study.log", "no journal file"),
             (f"journal:///{tmp_path}/absent/study.log", "folder of journal file"),
             ("mysql://u:p@127.0.0.1:1/db", "needs the Python module")]
    for storage, message in cases:
        assert main([*run, f"study.storage={storage}"]) == 2, storage
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert tracking.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_describe_arch_is_one_line():
    arch = {"num_layers": 2, "hidden_size": 64, "moe": {"router": "hierarchical", "num_experts": 8, "top_k": 2,
                                                        "expert_ffn_size": 32, "hierarchy_depth": 2,
                                                        "num_shared_experts": 1}}
    text = describe_arch(arch, {})
    assert text == "2 layers x 64 hidden; hierarchical router, 8 experts, top-2, expert ffn 32, hierarchy depth 2, " \
                   "1 shared"
    assert describe_arch(None, {"router": "topk"}) == "router=topk"


def test_describe_arch_says_which_layers_of_an_encoder_were_upcycled():
    from fulu_nas.interop.upcycle import UpcycleArch

    fields = dict(source_sha256="0" * 64, hidden_size=32, ffn_size=64, num_layers=4, num_heads=2, vocab_size=100,
                  max_seq_len=16)
    dense = UpcycleArch(**fields).to_dict()
    assert describe_arch(dense, {"layers": "dense"}) == "the dense model (4 layers, none upcycled)"
    upcycled = UpcycleArch(**fields, layers=(1, 3), migration={"num_experts": 8, "top_k": 2}).to_dict()
    text = describe_arch(upcycled, {})
    assert text.startswith("4 layers x 32 hidden, layers 1, 3 upcycled; topk router, 8 experts, top-2, expert ffn 64")


# ---------------------------------------------------------------- panels of in-memory studies (fast)


def _settings(tmp_path: Path, *overrides: str):
    """The real settings of a tiny search (composed only: nothing is run or written)."""
    from fulu_nas.search.app import compose_config
    from fulu_nas.search.settings import load_settings

    return load_settings(*compose_config(["+experiment=tiny", f"hydra.run.dir={tmp_path}", *overrides]))


def _trial(state: str = "COMPLETE", values=None, params=None, curve=None, constraints=None, **attrs):
    params = params if params is not None else {"a": 0}
    return optuna.trial.create_trial(
        state=optuna.trial.TrialState[state], values=values, params=params,
        distributions={k: optuna.distributions.IntDistribution(0, 9) for k in params},
        user_attrs=attrs, intermediate_values=curve or {}, constraints=constraints)


def _context(s, trials: list, **study_attrs):
    from fulu_nas.dashboard.context import Context

    study = optuna.create_study(directions=list(s.study.directions), study_name=s.study.name)
    for t in trials:
        study.add_trial(t)
    for k, v in study_attrs.items():
        study.set_user_attr(k, v)
    return Context(study, s, tracking_uri="")


@pytest.fixture(scope="module")
def maximised(tmp_path_factory):
    """A multi-objective study that maximises `metric` (and minimises latency_ms): a high metric takes
    a=9, whatever b; a low metric comes from a high b, whatever a."""
    s = _settings(tmp_path_factory.mktemp("max"), "study=multi_objective", "study.objectives=[metric,latency_ms]")
    assert s.study.directions == ("maximize", "minimize")
    trials = [_trial(values=[10.0 if a == 9 else -float(b), 1.0 + (7 * a + 3 * b) % 10], params={"a": a, "b": b})
              for a in range(10) for b in range(10)]
    return _context(s, trials)


def _traces(blocks: list, objective: str) -> list:
    """The traces of one objective: its own figure's, or those named after it in a shared figure."""
    figures = [b for b in blocks if not isinstance(b, str)]
    own = [f for f in figures if (f.layout.title.text or "").split(" (")[0] == objective]
    return list(own[0].data) if own else [tr for f in figures for tr in f.data if tr.name == objective]


def test_importances_of_a_maximised_objective_rank_the_parameters_for_high_values(maximised):
    from fulu_nas.dashboard.panels.importances import panel_importances

    bars = _traces(panel_importances(maximised, {}), "metric")[0]
    shown = dict(zip(bars.y, bars.x, strict=True))
    assert max(shown, key=shown.get) == "a", shown  # a high metric needs a=9; b only makes it low
    # what optuna's documentation says to do for a maximised objective: negate it in `target`
    with pytest.warns(UserWarning, match="low `target` values"):
        expected = optuna.importance.get_param_importances(maximised.plot_study, target=lambda t: -t.values[0])
    assert shown == pytest.approx(expected)


def test_importances_are_those_of_the_feasible_trials(tmp_path):
    """Trials over a study constraint were counted: the lowest losses, over the bound, made the
    parameter they share (b) look important, where among the trials that count only a matters."""
    from fulu_nas.dashboard.panels.importances import panel_importances

    s = _settings(tmp_path, "study.constraints={active_params:1.0e4}")
    feasible = [_trial(values=[1.0 + n % 10 / 10], params={"a": n % 10, "b": 3 * (n // 2) % 10},
                       constraints={"active_params": -1.0}) for n in range(20)]
    over = [_trial(values=[0.5 + a / 100], params={"a": a, "b": 0}, constraints={"active_params": 10.0})
            for a in range(10)]
    ctx = _context(s, feasible + over)
    blocks = panel_importances(ctx, {})
    bars = _traces(blocks, "loss")[0]
    shown = dict(zip(bars.y, bars.x, strict=True))
    only = optuna.create_study(directions=["minimize"])
    for t in feasible:
        only.add_trial(t)
    assert shown == pytest.approx(optuna.importance.get_param_importances(only))
    assert max(shown, key=shown.get) == "a", shown
    assert any("the 20 feasible complete trials (10 over a study constraint left out)" in b
               for b in blocks if isinstance(b, str)), blocks
    assert not any("mostly chance" in b for b in blocks if isinstance(b, str)), blocks  # 20 trials: no caveat
    one = _context(s, feasible[:1] + over)
    assert panel_importances(one, {}) == [note_html("Needs at least 2 complete feasible trials (1).")]
    # three trials: drawn, and said to be chance (two parameters that never changed ranked first)
    few = panel_importances(_context(s, feasible[:3] + over), {})
    assert note_html("Only 3 trials: importances from so few are mostly chance (a parameter that barely changed "
                     "may rank high); read them from 10 trials on.") in few


def test_optunas_warnings_on_the_importances_are_a_note_on_the_page_not_console_lines(tmp_path, recwarn):
    """A conditional parameter seen in one trial: optuna warned "Some regimes for parameter `depth` have less
    than 2 trials" three times on the dashboard's console; the page said nothing of it."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    from fulu_nas.dashboard.panels.importances import panel_importances

    trials = []
    for n in range(20):
        router = ("topk", "hierarchical")[n % 2]
        params = {"router": router, "a": n % 5, **({"depth": 2} if n == 1 else {})}
        distributions = {"router": CategoricalDistribution(["topk", "hierarchical"]), "a": IntDistribution(0, 9),
                         **({"depth": IntDistribution(2, 4)} if n == 1 else {})}
        trials.append(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=[1.0 + (7 * n) % 10],
                                                params=params, distributions=distributions))
    blocks = panel_importances(_context(_settings(tmp_path), trials), {})
    assert not [w for w in recwarn if "regimes" in str(w.message)], [str(w.message) for w in recwarn]
    notes = [b for b in blocks if isinstance(b, str)]
    assert notes == [note_html("optuna: Some regimes for parameter `depth` have less than 2 trials. The importance "
                               "of the parameter may be inaccurate.")], notes


def note_html(text: str) -> str:
    from fulu_nas.dashboard.panels.blocks import note

    return note(text)


def _brightness(colour: str) -> int:
    return sum(int(c) for c in re.findall(r"\d+", colour))


def test_parallel_coordinates_draw_the_best_value_of_each_objective_darkest(maximised):
    from fulu_nas.dashboard.panels.parallel import panel_parallel

    blocks = panel_parallel(maximised, {})
    for objective, direction in zip(maximised.objectives, maximised.directions, strict=True):
        lines = [tr for tr in _traces(blocks, objective) if tr.mode == "lines" and tr.y and tr.y[0] is not None]
        # y[0] is the objective's axis, scaled 0 (lowest value) .. 1 (highest)
        top = {_brightness(tr.line.color) for tr in lines if tr.y[0] == 1.0}
        bottom = {_brightness(tr.line.color) for tr in lines if tr.y[0] == 0.0}
        best, worst = (top, bottom) if direction == "maximize" else (bottom, top)
        assert max(best) < min(worst), f"{objective} ({direction}): the best trials are not the darkest lines"


def test_throughput_and_metric_are_shown_with_what_they_measure(tmp_path):
    """`throughput` (tokens/s) and `metric` (the task's own: accuracy here) had no unit or name in the
    table of trials, nor on an objective's axis."""
    from fulu_nas.dashboard.panels.history import panel_history
    from fulu_nas.dashboard.panels.parallel import panel_parallel
    from fulu_nas.dashboard.panels.top_trials import panel_top_trials

    ctx = _context(_settings(tmp_path), [_trial(values=[1.3], params={"a": a}, metrics={"throughput": 1e4 + a})
                                         for a in range(3)])
    table = next(b for b in panel_top_trials(ctx, {}) if b.startswith("<table"))
    assert "<th>metric (accuracy)</th>" in table and "<th>throughput (tokens/s)</th>" in table, table
    ctx = _context(_settings(tmp_path, "study.objectives=[throughput]", "study.pruner=none"),
                   [_trial(values=[1e4 + a], params={"a": a}) for a in range(3)])
    assert "<th>throughput (tokens/s) (max)</th>" in next(b for b in panel_top_trials(ctx, {}) if b.startswith("<t"))
    history = next(b for b in panel_history(ctx, {}) if not isinstance(b, str))
    assert history.layout.yaxis.title.text == "throughput (tokens/s)"
    parallel = next(b for b in panel_parallel(ctx, {}) if not isinstance(b, str))
    assert parallel.layout.xaxis.ticktext[0] == "throughput (tokens/s)"


def test_the_objective_axis_of_parallel_coordinates_has_distinct_tick_labels(tmp_path):
    """Losses 0.02 apart: the five ticks read 1.29, 1.3, 1.3, 1.3, 1.31 (three significant digits)."""
    from fulu_nas.dashboard.panels.parallel import panel_parallel

    losses = [1.2912, 1.2987, 1.3034, 1.3101, 1.3113]
    ctx = _context(_settings(tmp_path), [_trial(values=[v], params={"a": a}) for a, v in enumerate(losses)])
    fig = next(b for b in panel_parallel(ctx, {}) if not isinstance(b, str))
    ticks = [a.text for a in fig.layout.annotations if a.x == 0]
    assert len(ticks) == 5 and len(set(ticks)) == 5, ticks
    lo, hi = min(losses), max(losses)
    for text, a in zip(ticks, [a for a in fig.layout.annotations if a.x == 0], strict=True):
        assert float(text) == pytest.approx(lo + a.y * (hi - lo), abs=5e-4), ticks


def test_header_counts_trials_as_the_search_summary_does(tmp_path):
    from fulu_nas.dashboard.layout import Layout
    from fulu_nas.dashboard.page import render
    from fulu_nas.search.report import summarize

    s = _settings(tmp_path, "study.constraints={active_params:1.0e4}")
    ctx = _context(s, [
        _trial(values=[1.3], constraints={"active_params": 1876.0}, reference=True),  # over the bound
        _trial(values=[1.2], params={"a": 1}, constraints={"active_params": -100.0}),
        _trial(values=[1.2], params={"a": 1}, constraints={"active_params": -100.0}, cached_from=1),
        _trial("PRUNED", params={"a": 2}, infeasible="top_k >= num_experts"),  # never trained
        _trial("PRUNED", params={"a": 3}, curve={10: 1.5}, pruned_at_step=10),
        _trial("FAIL", params={"a": 4}, curve={10: 1.4}, fail_reason="over the time budget"),
    ])
    summary = summarize(ctx.study, s)
    assert (summary["n_complete"], summary["n_pruned"], summary["n_failed"], summary["n_infeasible"],
            summary["n_reused"]) == (3, 1, 1, 2, 1)
    facts = re.findall(r'<p class="facts">trials: (.*?)</p>', render(ctx, Layout("bare", "{study}", ())))
    assert facts == ["3 complete, 1 pruned, 1 failed, 2 infeasible, 1 reused"]


def test_a_reused_result_is_one_point_of_the_pareto_front(tmp_path):
    """A trial that reused an identical architecture's result has its values, so Optuna keeps both on
    the front: the panel, the table and the plot show the architecture once, as the summary does."""
    from fulu_nas.dashboard.panels.history import panel_pareto_front
    from fulu_nas.dashboard.panels.top_trials import panel_top_trials
    from fulu_nas.search.objective import pareto_front

    s = _settings(tmp_path, "study=multi_objective")
    ctx = _context(s, [
        _trial(values=[1.3, 2.0], reference=True, arch_hash="r"),
        _trial(values=[1.2, 3.0], params={"a": 1}, arch_hash="x"),
        _trial(values=[1.5, 1.0], params={"a": 2}, arch_hash="y"),
        _trial(values=[1.2, 3.0], params={"a": 1}, arch_hash="x", cached_from=1),
        _trial(values=[1.6, 3.5], params={"a": 3}, arch_hash="z"),  # dominated
    ])
    assert [t.number for t in ctx.pareto()] == [1, 0, 2]
    assert {t.number for t in ctx.pareto()} == {t.number for t in pareto_front(ctx.study)}
    blocks = panel_pareto_front(ctx, {})
    assert any("3 trial(s) on the front: 1, 0, 2." in b for b in blocks if isinstance(b, str))
    fig = next(b for b in blocks if not isinstance(b, str))
    points = [(x, y) for tr in fig.data for x, y in zip(tr.x, tr.y, strict=True)]
    assert sorted(points) == [(1.2, 3.0), (1.3, 2.0), (1.5, 1.0), (1.6, 3.5)]  # trial 3 drawn over 1 no more
    # each point's hover names its own trial: left out, the reused trial 3 had shifted trial 4 to "3"
    numbers = {(x, y): re.match(r"trial (\d+): ", text).group(1)
               for tr in fig.data for x, y, text in zip(tr.x, tr.y, tr.text, strict=True)}
    assert numbers == {(1.2, 3.0): "1", (1.3, 2.0): "0", (1.5, 1.0): "2", (1.6, 3.5): "4"}
    table = next(b for b in panel_top_trials(ctx, {}) if b.startswith("<table"))
    rows = re.findall(r"<tr(?: class=\"best\")?><td>(\d+)</td>.*?<td>([^<]*)</td></tr>", table)
    notes = dict(rows)
    assert notes["1"].startswith("Pareto front") and notes["3"] == "reuses trial 1"


def test_training_curves_include_the_failed_trials_that_reported_a_loss(tmp_path):
    from fulu_nas.dashboard.panels.training import panel_training_curves

    ctx = _context(_settings(tmp_path), [
        _trial(values=[1.2], curve={10: 1.5, 20: 1.3}),
        _trial("PRUNED", params={"a": 1}, curve={10: 1.6}),
        _trial("FAIL", params={"a": 2}, curve={10: 1.55, 20: 1.45}, fail_reason="over the time budget"),
        _trial("FAIL", params={"a": 3}, fail_reason="diverged before its first report"),
    ])
    blocks = panel_training_curves(ctx, {})
    fig = next(b for b in blocks if not isinstance(b, str))
    curves = {int(re.match(r"Trial(\d+)", tr.name).group(1)): tr for tr in fig.data}
    assert sorted(curves) == [0, 1, 2]  # every trial with a reported loss; trial 3 reported none
    assert list(curves[2].y) == [1.55, 1.45] and "failed" in curves[2].name
    assert any("failed" in b for b in blocks if isinstance(b, str))


def _all_failed(tmp_path: Path):
    """A finished study whose every trial failed, two over the time budget (one after reporting its loss)."""
    return _context(_settings(tmp_path), [
        _trial("FAIL", params={"a": 0}, curve={10: 1.55}, fail_reason="over the time budget"),
        _trial("FAIL", params={"a": 1}, fail_reason="over the time budget"),
        _trial("FAIL", params={"a": 2}, fail_reason="diverged: loss is nan"),
    ])


def test_optuna_logs_nothing_while_the_page_is_drawn(tmp_path):
    """Failed trials alone with a reported loss: optuna logged "Study instance does not contain trials."
    onto the console while drawing the training curves."""
    import logging

    from fulu_nas.dashboard.page import render

    ctx = _all_failed(tmp_path)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("optuna")
    logger.addHandler(handler)
    try:
        page = render(ctx, load_layout("default"))
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    assert page.count('class="plotly-graph-div"') == 1  # the failed trial's curve, dotted


def test_a_finished_study_whose_every_trial_failed_says_why(tmp_path):
    """Nothing running or waiting and no complete trial: the page said "the plots appear once one has" and
    "(none so far)", to a study that was over, and nowhere why its trials failed."""
    from fulu_nas.dashboard.page import render

    page = html.unescape(render(_all_failed(tmp_path), load_layout("default")))
    banners = re.findall(r'<p class="banner">(.*?)</p>', page)
    assert banners == ["The search finished with no complete trial (3 failed). Why the trials failed: over the time "
                       "budget (2 trials); diverged: loss is nan (1 trial)."], banners
    assert "appear once" not in page and "so far" not in page, page
    assert "Needs at least 1 complete trial (none)." in page and "No complete feasible trial." in page


def test_failure_reasons_that_differ_only_in_their_numbers_are_one_reason_on_the_page(tmp_path):
    """Out-of-memory failures each name their own sizes: the banner listed every one as a reason of its own,
    so five of them pushed the other reasons off it."""
    from fulu_nas.dashboard.page import render

    sizes = ["2.00 GiB", "1.50 GiB", "2.00 GiB", "0.75 GiB", "3.25 GiB", "1.00 GiB"]
    trials = [_trial("FAIL", params={"a": i}, fail_reason=f"out of memory: tried to allocate {size}")
              for i, size in enumerate(sizes)]
    trials.append(_trial("FAIL", params={"a": 7}, fail_reason="diverged: loss is nan"))
    page = html.unescape(render(_context(_settings(tmp_path), trials), load_layout("default")))
    banners = re.findall(r'<p class="banner">(.*?)</p>', page)
    assert banners == ["The search finished with no complete trial (7 failed). Why the trials failed: out of "
                       "memory: tried to allocate 2.00 GiB (6 trials, the numbers varying); diverged: loss is nan "
                       "(1 trial)."], banners


def test_parallel_coordinates_draw_the_worst_trial_visibly(maximised):
    """optuna colours the worst trial's line with the colour scale's first colour, near white, at half opacity:
    on the white page it could not be seen."""
    from fulu_nas.dashboard.panels.parallel import panel_parallel

    for block in panel_parallel(maximised, {}):
        if isinstance(block, str):
            continue
        lines = [tr for tr in block.data if tr.mode == "lines" and tr.y and tr.y[0] is not None]
        assert lines
        lightest = max(_brightness(tr.line.color) for tr in lines)
        assert lightest <= 3 * 200, f"the faintest line is {lightest / 3:.0f} of 255 bright on a white page"
        scales = [tr.marker.colorscale for tr in block.data if tr.mode == "markers" and tr.marker.showscale]
        # the colour bar shows the lines' colours: its lightest end is the faintest line
        assert len(scales) == 1 and _brightness(scales[0][0][1]) == lightest, (scales, lightest)


def test_confirmation_rank_plot_ranks_both_axes_among_the_confirmed_architectures(tmp_path):
    """The search ranked 6 architectures, the confirmation 3 of them: the reference, last in both,
    lies on the diagonal at (3, 3), not at (6, 3)."""
    from fulu_nas.dashboard.panels.confirmation import panel_confirmation
    from fulu_nas.search.confirm_summary import SUMMARY_ATTR, summarize_confirmation

    def arch(trial, rank, runs, reference=False):
        return {"trial": trial, "search_rank": rank, "reference": reference, "feasible": True, "arch_hash": str(trial),
                "search_values": [runs[0]], "runs": [{"values": [v]} for v in runs]}

    header = {"study": "tiny-clusters", "objectives": ["loss"], "directions": ["minimize"], "seeds": [0, 1],
              "steps": 100, "budget_factor": 1.0, "search_steps": 100, "failed_runs": []}
    summary = summarize_confirmation(header, [arch(2, 1, [1.28, 1.30]), arch(7, 2, [1.30, 1.31]),
                                              arch(0, 6, [1.31, 1.33], reference=True)], ["minimize"])
    ctx = _context(_settings(tmp_path), [_trial(values=[1.3])], **{SUMMARY_ATTR: summary})
    fig = next(b for b in panel_confirmation(ctx, {}) if not isinstance(b, str))
    points = {tr.name: list(zip(tr.x, tr.y, strict=True)) for tr in fig.data
              if tr.xaxis == "x" and tr.mode == "markers+text"}
    assert points == {"confirmed architectures": [(1, 1), (2, 2)], "reference": [(3, 3)]}
    diagonal = next(tr for tr in fig.data if tr.name == "same rank")
    assert list(diagonal.x) == [1, 3] and list(diagonal.y) == [1, 3]
    assert "among" in fig.layout.xaxis.title.text and "among" in fig.layout.yaxis.title.text


@pytest.mark.parametrize("made", ["fresh seeds", "before search_seed was kept"])
def test_the_confirmation_caption_names_the_search_s_seed_only_where_a_run_used_it(made, tmp_path):
    """The caption said "seed S is the search's own seed" of the first seed of every confirmation; a
    confirmation's seeds are fresh ones now, and only one made before began with the search's."""
    from fulu_nas.dashboard.panels.confirmation import panel_confirmation
    from fulu_nas.search.confirm_summary import SUMMARY_ATTR, summarize_confirmation

    seeds = [1, 2] if made == "fresh seeds" else [0, 1]
    header = {"study": "tiny-clusters", "objectives": ["loss"], "directions": ["minimize"], "seeds": seeds,
              "steps": 100, "budget_factor": 1.0, "search_steps": 100, "failed_runs": [],
              **({"search_seed": 0} if made == "fresh seeds" else {})}
    rows = [{"trial": t, "search_rank": r, "reference": t == 0, "feasible": True, "arch_hash": str(t),
             "search_values": [v[0]], "runs": [{"values": [x]} for x in v]}
            for t, r, v in ((2, 1, [1.28, 1.30]), (0, 2, [1.31, 1.33]))]
    summary = summarize_confirmation(header, rows, ["minimize"])
    ctx = _context(_settings(tmp_path), [_trial(values=[1.3])], **{SUMMARY_ATTR: summary})
    text = html.unescape(" ".join(b for b in panel_confirmation(ctx, {}) if isinstance(b, str)))
    assert f"2 seed(s) ({seeds[0]}, {seeds[1]})" in text
    if made == "fresh seeds":
        assert "the search's own seed" not in text, text
    else:
        assert "seed 0 is the search's own seed" in text, text


@pytest.mark.parametrize("command", ["dashboard", "export"])
def test_a_damaged_search_config_is_one_message_naming_it(command, tmp_path, monkeypatch, capsys):
    """search_config.json cut short, not a mapping, not UTF-8 or without its configuration: a
    JSONDecodeError, TypeError or UnicodeDecodeError traceback (exit 1)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    optuna.create_study(study_name="tiny-clusters", storage=f"sqlite:///{out / 'optuna.db'}")
    mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}").search_experiments()  # export reads runs: an empty one
    config = out / "search_config.json"
    for text, words in ((b'{"config": ', "is not valid JSON"), (b"[1, 2]", "is not a search configuration"),
                        (b"\xff\xfe", "is not valid JSON"), (b'{"config": 5}', "is not a search configuration"),
                        (b'{"typed_model": 3, "config": {}}', "is not a search configuration")):
        config.write_bytes(text)
        capsys.readouterr()
        assert main([command, "study.name=tiny-clusters", f"hydra.run.dir={out}"]) == 2, text
        err = capsys.readouterr().err
        assert f"{config} {words}" in err and "Traceback" not in err, err
    assert sorted(p.name for p in out.iterdir()) == ["mlflow.db", "optuna.db", "search_config.json"]


def test_the_multi_objective_confirmation_caption_names_each_objective_s_verdict(tmp_path):
    """One verdict per objective, joined without its name: "trial 2: beats the reference (p=...); not
    distinguishable from the reference (p=...)" left the reader to guess which was which."""
    from fulu_nas.dashboard.panels.confirmation import panel_confirmation
    from fulu_nas.search.confirm_summary import SUMMARY_ATTR, summarize_confirmation

    header = {"study": "tiny-clusters", "objectives": ["loss", "latency_ms"], "directions": ["minimize", "minimize"],
              "seeds": [1, 2, 3], "search_seed": 0, "steps": 100, "budget_factor": 1.0, "search_steps": 100,
              "failed_runs": []}
    rows = [{"trial": t, "search_rank": r, "reference": t == 0, "feasible": True, "arch_hash": str(t),
             "search_values": list(v[0]), "runs": [{"values": list(x)} for x in v]}
            for t, r, v in ((2, 1, [(1.20, 2.0), (1.21, 2.2), (1.19, 1.9)]),
                            (0, 2, [(1.31, 2.1), (1.33, 2.0), (1.32, 2.05)]))]
    summary = summarize_confirmation(header, rows, ["minimize", "minimize"])
    verdicts = [v["verdict"] for v in summary["architectures"][0]["vs_reference"]]
    ctx = _context(_settings(tmp_path, "study=multi_objective"), [_trial(values=[1.3, 2.0])],
                   **{SUMMARY_ATTR: summary})
    text = html.unescape(" ".join(b for b in panel_confirmation(ctx, {}) if isinstance(b, str)))
    assert f"trial 2: loss: {verdicts[0]}; latency_ms: {verdicts[1]}." in text, text


def test_a_wrong_study_name_with_its_storage_given_is_named_as_such(tmp_path, monkeypatch, capsys):
    """study.name=nope with study.storage= given: the message blamed tracking.uri (the folder of
    outputs/nope/mlflow.db does not exist) rather than the name the storage does not hold."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    storage = f"sqlite:///{tmp_path / 'kept' / 'optuna.db'}"
    optuna.create_study(study_name="other", storage=storage)
    capsys.readouterr()
    assert main(["dashboard", "study.name=nope", f"study.storage={storage}"]) == 2
    err = capsys.readouterr().err
    assert f"study.name: no study 'nope' in {storage} (it has: other)" in err and "tracking.uri" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


# ---------------------------------------------------------------- a real study (slow)


def _search(root: Path, out: Path, *overrides: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["search", "+experiment=tiny", f"hydra.run.dir={out}", *overrides]) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A finished tiny single-objective search and its default dashboard."""
    root = tmp_path_factory.mktemp("dash")
    out = root / "out"
    _search(root, out, "study.n_trials=4")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={out}"]) == 0
    return out


def _parent_run(out: Path, name: str = "tiny-clusters") -> str:
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'optuna.db'}")
    return study.user_attrs["mlflow_parent_run_id"]


def _sections(page: str) -> list[str]:
    return re.findall(r'<section id="panel-([a-z_]+)"', page)


def _notes(page: str) -> list[str]:
    return re.findall(r'<p class="note">(.*?)</p>', page, re.S)


def assert_self_contained(page: str) -> None:
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I), "external script"
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?https?:", page, re.I), "external stylesheet"
    assert "Plotly.newPlot" in page and "plotly.js" in page.lower()


@pytest.mark.slow
def test_dashboard_of_a_search_has_every_panel_and_is_logged_on_the_parent_run(tiny, tmp_path):
    page = (tiny / "dashboard.html").read_text()
    assert_self_contained(page)
    assert _sections(page) == DEFAULT_PANELS
    assert "<h2>Optimization history</h2>" in page  # the objective panel of a single-objective study
    degraded = [n for n in _notes(page) if "could not" in n or "Needs at least" in n or "no " in n.lower()]
    assert degraded == [], "a panel degraded on a finished study"
    # plots: history, importances, parallel, training curves, expert load, routing matrix; the table of trials
    assert page.count('class="plotly-graph-div"') == 6
    assert page.count('<table class="trials">') == 1 and "reference" in page
    assert re.search(r"(topk|hash) router, \d experts", page), "hover/table shows the architecture"
    assert "domain0" in page and "MoE layer 0" in page

    client = mlflow.MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    parent = _parent_run(tiny)
    assert "dashboard.html" in {a.path for a in client.list_artifacts(parent)}
    logged = Path(client.download_artifacts(parent, "dashboard.html", str(tmp_path))).read_text()
    assert _sections(logged) == DEFAULT_PANELS and len(logged) == len(page)


@pytest.mark.slow
def test_other_layout_and_out(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = tmp_path / "mine.yaml"
    layout.write_text("title: 'Mine: {study}'\npanels:\n  - {panel: top_trials, rows: 2, title: Best two}\n"
                      "  - history\n")
    out = tmp_path / "pages" / "mine.html"
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", f"layout={layout}",
                 f"out={out}"]) == 0
    page = out.read_text()
    assert _sections(page) == ["top_trials", "history"] and "<h2>Best two</h2>" in page
    assert "Mine: tiny-clusters" in page
    rows = re.search(r"<tbody>(.*)</tbody>", page).group(1).count("<tr")
    assert rows in (2, 3)  # the two best, plus the reference when it is not one of them
    client = mlflow.MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    assert "dashboard-mine.html" in {a.path for a in client.list_artifacts(_parent_run(tiny))}


@pytest.mark.slow
def test_bad_layout_on_a_real_study_exits_2_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("panels: [objective, histogram]\n")
    client = mlflow.MlflowClient(f"sqlite:///{tiny / 'mlflow.db'}")
    before = {a.path for a in client.list_artifacts(_parent_run(tiny))}
    for layout in ("nope", str(bad)):
        out = tmp_path / "x.html"
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", f"layout={layout}",
                     f"out={out}"]) == 2
        assert not out.exists()
    err = capsys.readouterr().err
    assert "no layout 'nope'" in err and "unknown panel 'histogram'" in err
    assert {a.path for a in client.list_artifacts(_parent_run(tiny))} == before


@pytest.mark.slow
def test_a_wrong_tracking_uri_or_out_is_one_message_and_makes_nothing(tiny, tmp_path, monkeypatch, capsys):
    """An unreachable server was waited on for minutes without a word; a SQLite database in a missing
    folder was created (folder and all) before the page was drawn."""
    monkeypatch.chdir(tmp_path)
    port = free_port()  # nothing listens there
    for uri, words in ((f"http://127.0.0.1:{port}", "cannot reach the MLflow server"),
                       (f"sqlite:///{tmp_path}/nowhere/mlflow.db", "does not exist")):
        started = time.perf_counter()
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", f"tracking.uri={uri}",
                     f"out={tmp_path / 'x.html'}"]) == 2
        assert words in capsys.readouterr().err and time.perf_counter() - started < 60
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "a_file").write_text("")  # an out= that cannot be written: a traceback after drawing the page
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}",
                 f"out={tmp_path / 'a_file' / 'd.html'}"]) == 2
    assert "out:" in capsys.readouterr().err
    # a folder that takes no new file whatever its permissions say (root passes every permission check):
    # a FileNotFoundError traceback once the page was drawn
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", "out=/proc/d.html"]) == 2
    err = capsys.readouterr().err
    assert "out: cannot write in the folder '/proc' (making a file there failed: " in err, err
    assert err.startswith("error: ") and "Traceback" not in err, err


@pytest.mark.slow
def test_out_never_replaces_what_is_not_a_page_and_a_failed_write_keeps_the_earlier_page(tiny, tmp_path,
                                                                                         monkeypatch, capsys):
    """out=<folder>/optuna.db replaced the study's database with the page (exit 0); a dangling link or a name too
    long was a traceback; a full disk left the earlier page cut short."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    digest = hashlib.sha256((tiny / "optuna.db").read_bytes()).hexdigest()
    (tmp_path / "loop.html").symlink_to(tmp_path / "loop.html")
    (tmp_path / "study.html").symlink_to(tiny / "optuna.db")  # an .html name, leading to the database
    for out, words in ((tiny / "optuna.db", f"out: {tiny / 'optuna.db'} is not an .html file name"),
                       (tiny / "mlflow.db", "is not an .html file name"),
                       (tmp_path / "study.html", f"(a link to {tiny / 'optuna.db'}) is not an .html file name"),
                       (tmp_path / "loop.html", "is a symbolic link that loops"),
                       (tmp_path / ("x" * 300 + ".html"), "out: cannot write ")):
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", f"out={out}"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 2 and "Traceback" not in err, err
    assert hashlib.sha256((tiny / "optuna.db").read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loop.html", "study.html"]

    page = tmp_path / "page.html"
    page.write_text("the earlier page")
    page.chmod(0o640)

    import builtins

    real_open = builtins.open

    class DiskFull:  # the page's file, filling up after its first kilobyte
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[:1000])
            raise OSError(28, "No space left on device")

    def open_on_a_full_disk(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        return DiskFull(f) if isinstance(file, int) else f  # the partial file, opened from mkstemp's handle

    monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
    assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", f"out={page}"]) == 2
    assert f"out: cannot write {page}: No space left on device" in capsys.readouterr().err
    assert page.read_text() == "the earlier page" and sorted(p.name for p in tmp_path.iterdir()) == [
        "loop.html", "page.html", "study.html"]
    # written whole, through a link to a file not there yet, and over a page keeping its permissions
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latest.html").symlink_to(tmp_path / "pages" / "new.html")
    for out in (page, tmp_path / "latest.html"):
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}", f"out={out}"]) == 0
    assert "Plotly.newPlot" in page.read_text() and page.stat().st_mode & 0o777 == 0o640
    assert "Plotly.newPlot" in (tmp_path / "pages" / "new.html").read_text()
    assert not [p for p in tmp_path.rglob("*.partial")]


@pytest.mark.slow
def test_the_page_of_a_study_whose_folder_another_study_took_is_its_own(tiny, monkeypatch, tmp_path, capsys):
    """Two studies searched into one folder wrote one dashboard.html, the second study's page replacing the
    first's. The folder's search_config.json names the study searched there last; another study's page gets
    its name."""
    import json

    monkeypatch.chdir(tmp_path)
    config = tiny / "search_config.json"
    saved = config.read_text()
    data = json.loads(saved)
    data["config"]["study"]["name"] = "another study"  # as a later search of it into this folder leaves it
    config.write_text(json.dumps(data))
    before = (tiny / "dashboard.html").read_bytes()
    try:
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={tiny}"]) == 0
    finally:
        config.write_text(saved)
    assert f"dashboard: {tiny / 'dashboard-tiny-clusters.html'}" in capsys.readouterr().out
    assert (tiny / "dashboard.html").read_bytes() == before
    assert _sections((tiny / "dashboard-tiny-clusters.html").read_text()) == DEFAULT_PANELS
    (tiny / "dashboard-tiny-clusters.html").unlink()


def test_study_names_that_differ_only_in_characters_a_file_name_cannot_hold_get_pages_of_their_own():
    """`a b` and `a/b` both became dashboard-a_b.html: the second study's page replaced the first's."""
    from fulu_nas.dashboard.command import _file_name_part

    parts = {name: _file_name_part(name) for name in ("a b", "a/b", "a_b", "a  b", "..", "tiny-clusters")}
    assert len(set(parts.values())) == len(parts), parts
    assert parts["a_b"] == "a_b" and parts["tiny-clusters"] == "tiny-clusters"  # a name a file can hold is kept
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p) and not p.startswith(".") for p in parts.values()), parts
    assert parts["a b"].startswith("a_b-") and parts[".."].startswith("study-"), parts


@pytest.mark.slow
def test_a_missing_tracking_database_is_one_message_and_none_is_made(tiny, tmp_path, monkeypatch, capsys):
    """The folder's mlflow.db deleted, or tracking.uri naming a file that is not there (a typo): MLflow made
    an empty database there, printed its INFO logs, drew panels that said each run was not found and failed
    to log the page (exit 1)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("optuna.db", "search_config.json"):
        shutil.copy(tiny / name, out / name)
    typo = tmp_path / "mlflw.db"
    for extra, missing in (([], out / "mlflow.db"), ([f"tracking.uri=sqlite:///{typo}"], typo)):
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={out}", *extra]) == 2
        captured = capsys.readouterr()
        assert f"tracking.uri: sqlite:///{missing}: no such database" in captured.err, captured.err
        assert "Traceback" not in captured.err and "INFO" not in captured.err and captured.out == ""
        assert not missing.exists()
    assert sorted(p.name for p in out.iterdir()) == ["optuna.db", "search_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.fixture(scope="module")
def running(tiny, tmp_path_factory) -> Path:
    """A study that is still running and has no complete trial: running (with a training curve so
    far), waiting, failed and pruned trials, in a copy of the tiny search's folder."""
    out = tmp_path_factory.mktemp("running") / "out"
    out.mkdir()
    shutil.copy(tiny / "optuna.db", out / "optuna.db")
    searched = json.loads((tiny / "search_config.json").read_text())
    searched["config"]["study"]["name"] = "tiny-running"  # a folder's configuration is its own study's
    (out / "search_config.json").write_text(json.dumps(searched))
    study = optuna.create_study(study_name="tiny-running", storage=f"sqlite:///{out / 'optuna.db'}")
    dist = {"router": optuna.distributions.CategoricalDistribution(["topk", "hash"])}
    failed = study.ask(dist)
    failed.set_user_attr("fail_reason", "diverged: loss is nan")
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    pruned = study.ask(dist)
    pruned.report(1.5, step=10)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    running = study.ask(dist)
    running.report(1.4, step=10)
    running.report(1.3, step=20)
    study.enqueue_trial({"router": "topk"})
    return out


@pytest.mark.slow
def test_a_running_study_with_no_complete_trial_renders(running, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["dashboard", "study.name=tiny-running", f"hydra.run.dir={running}"]) == 0
    assert "no parent run" in capsys.readouterr().err
    page = (running / "dashboard.html").read_text()
    assert_self_contained(page)
    assert _sections(page) == DEFAULT_PANELS
    assert "No trial has completed yet" in page and "still running (1 running, 1 waiting)" in page
    assert "1 pruned, 1 failed, 1 running, 1 waiting" in page
    assert "Needs at least 2 complete trials (none so far)" in page
    assert page.count('class="plotly-graph-div"') == 1  # the training curves of the pruned and running trials
    # fulu-nas confirm refuses a study without a complete trial: the panel does not advise it
    assert "Nothing to confirm yet: the study has no complete trial." in page and "fulu-nas confirm" not in page


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi")
    out = root / "out"
    _search(root, out, "study=multi_objective", "study.n_trials=3")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["dashboard", "study.name=tiny-clusters", f"hydra.run.dir={out}"]) == 0
    return out


@pytest.mark.slow
def test_multi_objective_study_gets_the_pareto_panel(multi):
    page = (multi / "dashboard.html").read_text()
    assert_self_contained(page)
    assert _sections(page) == DEFAULT_PANELS
    assert "<h2>Pareto front</h2>" in page and "on the front:" in page
    assert "<th>latency_ms (min)</th>" in page and re.search(r"<td>Pareto front", page)
    # each point's hover: its trial, objectives and architecture in words (optuna's was the trial as JSON)
    hovers = re.findall(r"trial \d+: loss [^\"]+? hidden;", page)
    assert hovers and all("latency_ms" in h for h in hovers), hovers[:3]
    assert '\\"params\\"' not in page and '\\"number\\"' not in page
    client = mlflow.MlflowClient(f"sqlite:///{multi / 'mlflow.db'}")
    assert "dashboard.html" in {a.path for a in client.list_artifacts(_parent_run(multi))}


# ---------------------------------------------------------------- in a browser (slow, needs chromium)

# Collects window errors, unhandled rejections and console.error calls, and writes them into the
# page once it has loaded, for --dump-dom to read back.
_CATCH_ERRORS = """<script>
window.__errors = [];
window.addEventListener("error", (e) => window.__errors.push("error: " + e.message));
window.addEventListener("unhandledrejection", (e) => window.__errors.push("rejection: " + e.reason));
(() => { const orig = console.error; console.error = (...a) => { window.__errors.push("console: " + a.join(" "));
  orig(...a); }; })();
window.addEventListener("load", () => setTimeout(() => { const pre = document.createElement("pre");
  pre.id = "js-errors"; pre.textContent = JSON.stringify(window.__errors); document.body.appendChild(pre); }, 2000));
</script>"""


def _chromium(args: list[str], url: str, profile: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
               "--hide-scrollbars", "--no-first-run", "--disable-extensions", f"--user-data-dir={profile}",
               "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", *args, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line and re.search(r"Uncaught|Error|error", line)]


def _png_is_not_blank(path: Path, min_ink: float) -> None:
    Image = pytest.importorskip("PIL.Image")
    ImageStat = pytest.importorskip("PIL.ImageStat")
    with Image.open(path) as img:
        gray = img.convert("L")
        assert gray.size[0] >= 1000 and gray.size[1] >= 2000
        assert ImageStat.Stat(gray).stddev[0] > 10, "the screenshot is blank"
        dark = sum(gray.histogram()[:200])  # pixels clearly darker than the white background
        assert dark / (gray.size[0] * gray.size[1]) > min_ink, "the screenshot is almost empty"


def assert_renders(page_path: Path, tmp_path: Path, *, plots: int | None = None, min_ink: float = 0.02) -> None:
    """Open the page in headless Chromium: no JavaScript error, every plotly div drawn, and a
    screenshot that is not blank."""
    page = page_path.read_text()
    figures = page.count('class="plotly-graph-div"')
    probe = tmp_path / f"probe-{page_path.name}"
    probe.write_text(page.replace("<head>", "<head>" + _CATCH_ERRORS, 1))
    dom = _chromium(["--dump-dom"], probe.as_uri(), tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="js-errors">(.*?)</pre>', dom.stdout, re.S)
    assert found, "the page did not finish loading: " + dom.stderr[-2000:]
    assert json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&")) == []
    assert _console_errors(dom.stderr) == []
    drawn = len(re.findall(r'class="plotly-graph-div js-plotly-plot"', dom.stdout))
    assert drawn == figures and (plots is None or drawn == plots)
    assert dom.stdout.count('class="main-svg"') >= figures  # plotly drew its SVG layers

    shot = tmp_path / f"{page_path.stem}.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1200,3000"], page_path.as_uri(), tmp_path / "profile")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert _console_errors(run.stderr) == []
    _png_is_not_blank(shot, min_ink)


@pytest.mark.slow
@needs_chromium
def test_dashboard_renders_in_chromium(tiny, tmp_path):
    assert_renders(tiny / "dashboard.html", tmp_path, plots=6)


@pytest.mark.slow
@needs_chromium
def test_running_and_multi_objective_dashboards_render_in_chromium(running, multi, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if not (running / "dashboard.html").exists():
        assert main(["dashboard", "study.name=tiny-running", f"hydra.run.dir={running}"]) == 0
    assert_renders(running / "dashboard.html", tmp_path, plots=1, min_ink=0.005)  # mostly text
    assert_renders(multi / "dashboard.html", tmp_path)


@pytest.mark.slow
@needs_chromium
def test_catching_script_reports_errors(tmp_path):
    """The probe itself sees a JavaScript error (else the render test would prove nothing)."""
    page = tmp_path / "broken.html"
    page.write_text("<html><head></head><body><p>x</p><script>notDefined();</script></body></html>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("<head>", "<head>" + _CATCH_ERRORS, 1))
    dom = _chromium(["--dump-dom"], probe.as_uri(), tmp_path / "profile")
    found = re.search(r'<pre id="js-errors">(.*?)</pre>', dom.stdout, re.S)
    assert found and "notDefined" in found.group(1)
    assert _console_errors(dom.stderr)

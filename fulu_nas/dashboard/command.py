"""``fulu-nas dashboard``: one self-contained interactive HTML page of a study.

``fulu-nas dashboard study.name=NAME [layout=default] [out=FILE]`` (plus the overrides that locate
the study when the search used them: ``study.storage=``, ``tracking.uri=``, ``hydra.run.dir=``)
draws the panels of a layout (``dashboards/<layout>.yaml``: a title and a list of panels) with
``optuna.visualization`` and plotly, inlines plotly.js (the page works offline and inside the
MLflow UI's sandboxed iframe), writes it to ``out`` (default ``<output folder>/dashboard.html``, or
``dashboard-<layout>.html`` for another layout) and logs it to the study's parent MLflow run, where
the MLflow UI shows it inline.

The page is a snapshot: a study that is still running (trials running, waiting, failed, pruned,
or none complete yet) gives a page that says so, with whatever can be drawn. Bad input (unknown
study, layout or panel) is one message and exit code 2, with nothing written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

from ..errors import FuluConfigError
from .context import Context
from .layout import Layout, available_layouts, load_layout
from .page import render, trial_counts
from .panels import PANELS

BAD_INPUT = 2
OPTIONS = {"layout": "default", "out": ""}
ARTIFACT = "dashboard.html"
USAGE = """usage: fulu-nas dashboard study.name=NAME [layout=default|NAME|FILE.yaml] [out=FILE] [overrides ...]

Renders one self-contained HTML page of a study (plotly; works offline) from a layout in
dashboards/, writes it to out (default: <the search's output folder>/dashboard.html, or
dashboard-<layout>.html for another layout, with -<study> added where another study was searched into
the folder since; an .html file; a folder: that name in it) and logs it to the study's
parent MLflow run (open it with `fulu-nas ui <output folder>`). Pass the overrides that locate the
study when the search used them: study.storage=..., tracking.uri=..., hydra.run.dir=..., and
--config-dir DIR with its search_space=...
"""


def build(argv: list[str]) -> tuple[str, Path, Context, Layout, str | None]:
    """Validate, locate the study, render: (page, where to write it, context, layout, parent run)."""
    from ..checks import check_tracking_database_exists
    from ..search.locate import folder_is_the_studys, load_study, locate_study, search_settings, split_options
    from ..search.storage import check_output_dir
    from ..search.tracking import PARENT_RUN_ATTR, quiet_mlflow

    quiet_mlflow()  # locating a study outside its folder downloads its settings from the parent run: no bars
    own, overrides = split_options(argv, OPTIONS)
    layout = load_layout(own["layout"] or "default")
    location = locate_study(overrides)
    study = load_study(location)
    if uses_mlflow(study):
        # MLflow opening a SQLite file that is not there makes an empty database (the runs then "not
        # found"): a missing or wrong tracking database is one message. A study that has no run yet
        # (no parent run, no trial run) is drawn without one.
        check_tracking_database_exists(location.tracking_uri)
    settings = search_settings(location, study)
    # Several studies may be searched into one folder: the page of one whose folder another took is its own.
    name = artifact_name(layout) if folder_is_the_studys(location) else \
        artifact_name(layout).removesuffix(".html") + f"-{_file_name_part(location.name)}.html"
    if own["out"]:
        out = Path(own["out"])
        # os.path's: False where the name cannot be looked at (too long), which the write then names
        if os.path.isdir(out) or own["out"].endswith("/"):
            out = out / name
        if os.path.islink(out):  # written where it leads
            try:
                out = out.resolve()
            except (OSError, RuntimeError):
                raise FuluConfigError(f"out: {own['out']} is a symbolic link that loops; give the file "
                                      "itself") from None
        if out.suffix.lower() not in (".html", ".htm"):  # out=optuna.db replaced the study with the page
            leads = f" (a link to {out})" if os.path.islink(own["out"]) else ""
            raise FuluConfigError(f"out: {own['out']}{leads} is not an .html file name: the dashboard is an HTML "
                                  f"page (give a folder, ending in /, to have it written there as {name})")
    else:
        out = location.output_dir / name
    check_output_dir(str(out.parent), "out")  # before the page is drawn, not a traceback after
    if os.path.isdir(out):
        raise FuluConfigError(f"out: {out} is a folder")
    ctx = Context(study, settings, location.tracking_uri)
    return render(ctx, layout), out, ctx, layout, study.user_attrs.get(PARENT_RUN_ATTR)


def uses_mlflow(study) -> bool:
    """Whether the page reads or writes MLflow runs of the study: its parent run, a trial's run."""
    from ..search.tracking import PARENT_RUN_ATTR

    return bool(study.user_attrs.get(PARENT_RUN_ATTR)) or any(
        t.user_attrs.get("mlflow_run_id") or t.user_attrs.get("weights_run_id")
        for t in study.get_trials(deepcopy=False))


def artifact_name(layout: Layout) -> str:
    return ARTIFACT if layout.name == "default" else f"dashboard-{layout.name}.html"


def _file_name_part(text: str) -> str:
    """``text`` (a study's name) as part of a file name: letters, digits, '.', '_' and '-' kept, the rest '_'.
    A name so changed ends in 8 hex digits of its hash: studies named ``a b`` and ``a/b`` in one folder
    must not share a page."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "study"
    return part if part == text else f"{part}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def write_page(out: Path, page: str) -> None:
    """The page written at ``out`` whole, or FuluConfigError: written beside it, then renamed over it, so that
    a failure (a full disk, a name too long) leaves the earlier page as it was."""
    partial = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=".dashboard-", suffix=".partial", dir=out.parent)
        partial = Path(name)
        with open(handle, "w", encoding="utf-8") as f:
            f.write(page)
        if os.path.isfile(out):  # the earlier page's permissions
            partial.chmod(os.stat(out).st_mode & 0o7777)
        else:  # as a file written in place would be (mkstemp's is private)
            umask = os.umask(0)
            os.umask(umask)
            partial.chmod(0o666 & ~umask)
        os.replace(partial, out)
    except OSError as e:
        if partial is not None:
            with contextlib.suppress(OSError):
                partial.unlink()
        raise FuluConfigError(f"out: cannot write {out}: {e.strerror or e}") from None


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\nlayouts: " + ", ".join(available_layouts()) + "\npanels: " + ", ".join(PANELS))
        return 0
    if "layout=" in argv:  # an empty layout drew the default one, unasked
        print("error: invalid dashboard request:\n  - layout: empty; give a layout (default, a name in dashboards/ "
              "or a .yaml file), or leave layout= out for the default", file=sys.stderr)
        return BAD_INPUT
    try:
        page, out, ctx, layout, parent = build(argv)
        write_page(out, page)
    except FuluConfigError as e:
        print("error: invalid dashboard request:\n  - " + "\n  - ".join(e.problems), file=sys.stderr)
        return BAD_INPUT
    print(f"dashboard: {out}  ({trial_counts(ctx.trials)}; layout {layout.name})")
    if not parent:
        print("not logged to MLflow: the study has no parent run", file=sys.stderr)
        return 0
    import mlflow

    from ..search.tracking import moved_artifact_folder

    try:
        client = mlflow.MlflowClient(ctx.tracking_uri)
        if moved := moved_artifact_folder(client.get_run(parent).info.artifact_uri, ctx.s.output_dir):
            print(f"not logged to MLflow: run {parent} keeps its artifacts in {moved}, which does not exist (was the "
                  "study's folder moved from there? MLflow's runs keep the absolute path of their artifacts)",
                  file=sys.stderr)
            return 0
        client.log_text(parent, page, artifact_name(layout))
    except Exception as e:  # the page is written; say why it is not in MLflow
        reason = " ".join(str(e).split())[:300]
        print(f"warning: could not log the dashboard to MLflow run {parent}: {reason}", file=sys.stderr)
        return 1
    print(f"logged to MLflow run {parent} as {artifact_name(layout)}  ({ctx.s.ui_command()})")
    return 0

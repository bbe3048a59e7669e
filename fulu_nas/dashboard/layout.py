"""Dashboard layouts: ``layouts/<name>.yaml`` (or any YAML file), a page title and the panels to draw,
each checked against the panel registry when it is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checks import strict_yaml, yaml_problem
from ..errors import FuluConfigError
from .panels import PANELS

LAYOUTS_DIR = Path(__file__).resolve().parent / "layouts"


@dataclass(frozen=True)
class Panel:
    name: str
    title: str  # "" : the panel's own title
    description: str = ""
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Layout:
    name: str
    title: str
    panels: tuple[Panel, ...]


def available_layouts() -> list[str]:
    return sorted(p.stem for p in LAYOUTS_DIR.glob("*.yaml"))


def load_layout(name: str) -> Layout:
    """``dashboards/<name>.yaml``, or a YAML file path; every problem in one FuluConfigError."""
    import yaml

    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
    else:
        path = LAYOUTS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FuluConfigError(f"layout: no layout {name!r} (layouts in {LAYOUTS_DIR}: "
                              f"{', '.join(available_layouts()) or 'none'}; or pass a path to a .yaml file)")
    try:
        data = strict_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise FuluConfigError(f"layout: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise FuluConfigError(f"layout: {path} is not valid YAML: {yaml_problem(e)}") from None
    problems: list[str] = []
    if not isinstance(data, dict):
        raise FuluConfigError(f"layout: {path} must be a mapping with `title` and `panels`")
    for key in sorted(set(data) - {"title", "panels"}):
        problems.append(f"layout {path.stem}: unknown key {key!r} (keys: title, panels)")
    title = data.get("title", "{study}")
    if not isinstance(title, str):
        problems.append(f"layout {path.stem}: title must be a string")
        title = "{study}"
    entries = data.get("panels")
    if not isinstance(entries, list) or not entries:
        problems.append(f"layout {path.stem}: panels must be a non-empty list of panel names (known: "
                        f"{', '.join(PANELS)})")
        entries = []
    panels = []
    for i, entry in enumerate(entries):
        where = f"layout {path.stem}: panels[{i}]"
        if isinstance(entry, str):
            entry = {"panel": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("panel"), str):
            problems.append(f"{where}: expected a panel name or a mapping with `panel: NAME`")
            continue
        name_ = entry["panel"]
        if name_ not in PANELS:
            problems.append(f"{where}: unknown panel {name_!r} (known: {', '.join(PANELS)})")
            continue
        spec = PANELS[name_]
        options = {k: v for k, v in entry.items() if k not in ("panel", "title", "description")}
        for key in sorted(set(options) - set(spec.options)):
            allowed = ", ".join(["title", "description", *spec.options])
            problems.append(f"{where}: panel {name_!r} has no option {key!r} (options: {allowed})")
        for key, value in options.items():
            check = spec.options.get(key)
            if check is not None and not check(value):
                problems.append(f"{where}: {name_}.{key}={value!r} is not valid ({spec.option_help[key]})")
        for key in ("title", "description"):
            if key in entry and not isinstance(entry[key], str):
                problems.append(f"{where}: {key} must be a string")
        panels.append(Panel(name_, str(entry.get("title", "")), str(entry.get("description", "")),
                            {k: v for k, v in options.items() if k in spec.options}))
    if problems:
        raise FuluConfigError(problems)
    return Layout(path.stem, title, tuple(panels))


"""scripts/device_wheels.py: the wheels a GPU machine without the search stack needs, for its Python."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("device_wheels", ROOT / "scripts" / "device_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_list_holds_the_search_stack_and_nothing_the_machine_has():
    script = load_script()
    packages = script.needed("3.12")
    # what the search, the tracking and the export import, and what they need in turn
    assert {"optuna", "hydra-core", "omegaconf", "antlr4-python3-runtime", "mlflow-skinny", "mlflow-tracing",
            "sqlalchemy", "alembic", "plotly", "colorlog"} <= set(packages)
    assert not set(packages) & script.ON_DEVICE
    assert "torch" not in packages and "numpy" not in packages and "mlflow" not in packages
    # requirements for other Pythons and platforms are left out
    assert "dataclasses" not in packages and "pywin32" not in packages
    assert all(version for version in packages.values())


@pytest.mark.slow
def test_it_downloads_binary_wheels_for_the_gpu_machine_and_builds_the_source_only_one(tmp_path):
    script = load_script()
    packages = script.needed("3.12")
    subset = {name: packages[name] for name in ("antlr4-python3-runtime", "sqlalchemy", "colorlog")}
    try:
        wheels = script.download(subset, tmp_path, "3.12")
    except SystemExit as e:  # pragma: no cover - a machine without the package index
        pytest.skip(f"no package index: {e}")
    names = sorted(w.name for w in wheels)
    assert len(names) == 3
    assert any(n.startswith("antlr4_python3_runtime-4.9.3-py3-none-any") for n in names)  # built here from source
    sqlalchemy = next(n for n in names if n.lower().startswith("sqlalchemy"))
    assert "cp312" in sqlalchemy and "x86_64" in sqlalchemy  # the machine's Python and platform, not this one's
    for wheel in wheels:
        assert zipfile.ZipFile(wheel).testzip() is None


def test_the_documented_command_line_lists_the_wheels_it_would_write(tmp_path):
    """The command gpu.md gives, run as a command (with --dry-run, which downloads nothing): its options
    parse, and it lists the search stack pinned to the versions installed here."""
    import subprocess
    import sys

    out = tmp_path / ".whl"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_wheels.py"), "--out", str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = dict(line.split("==") for line in done.stdout.split())
    assert listed == load_script().needed("3.12")
    assert {"optuna", "hydra-core", "mlflow-skinny"} <= set(listed)
    assert not out.exists()

"""A wheel installed into a fresh virtual environment runs the three user actions (search, dashboard,
export) from an empty folder outside the checkout: configs, spaces and layouts ship in the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    # No PYTHONPATH: nothing may lead the installed package back to the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_search_dashboard_and_export(tmp_path):
    # Built from a copy without build outputs: setuptools reuses a checkout's build/ folder, which could
    # hold files the package no longer declares.
    source, dist = tmp_path / "source", tmp_path / "dist"
    skip = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "outputs", ".*cache")
    shutil.copytree(ROOT, source, symlinks=True, ignore=skip)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source)], cwd=tmp_path)
    wheel = next(dist.glob("fulu_nas-*.whl"))
    venv = tmp_path / "venv"
    # The dependencies (torch, optuna, mlflow, ...) come from this interpreter's site-packages; the
    # package itself only from the wheel (--ignore-installed: the checkout's editable install is not used).
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    python, fulu = venv / "bin" / "python", venv / "bin" / "fulu-nas"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import fulu_nas; print(fulu_nas.__file__)"], cwd=work).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    _run([str(fulu), "search", "+experiment=tiny", "study.n_trials=2", "study.pruner=none"], cwd=work)
    out = work / "outputs" / "tiny-clusters"
    assert (out / "optuna.db").is_file() and (out / "summary.json").is_file()

    _run([str(fulu), "dashboard", "study.name=tiny-clusters"], cwd=work)
    assert "plotly" in (out / "dashboard.html").read_text()

    _run([str(fulu), "export", "study.name=tiny-clusters", "out=model"], cwd=work)
    exported = {p.name for p in (work / "model").iterdir()}
    assert {"model.safetensors", "model.pt2", "config.yaml", "checksums.json"} <= exported
    # the exported program runs with torch alone
    check = ("import torch; m = torch.export.load('model/model.pt2').module(); "
             "print(tuple(m(torch.zeros(1, 16, dtype=torch.long)).shape))")
    assert _run([str(python), "-c", check], cwd=work).stdout.strip().startswith("(1, 16,")

"""scripts/device_wheels.py: the wheels a GPU machine without the search stack needs, for its Python."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from importlib import metadata
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
    out = tmp_path / ".whl"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "device_wheels.py"), "--out", str(out), "--dry-run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = dict(line.split("==") for line in done.stdout.split())
    assert listed == load_script().needed("3.12")
    assert {"optuna", "hydra-core", "mlflow-skinny"} <= set(listed)
    assert not out.exists()


def _link_the_gpu_machines_packages(script, into: Path, python_version: str) -> None:
    """A folder holding links to the distributions of ``ON_DEVICE`` installed here and what they need
    (less what the wheels carry): the packages a GPU machine ships, with their metadata, and nothing of
    the search stack."""
    carried, seen, todo = set(script.needed(python_version)), set(), list(script.ON_DEVICE)
    into.mkdir()
    while todo:
        name = todo.pop()
        if name in seen or name in carried:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:  # not installed here (the image has more than this machine)
            continue
        todo.extend(script._requirement_names(dist, python_version))
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or [] if Path(f).parts[0] not in ("..", "bin")}:
            if (base / top).exists() and not (into / top).exists() and not top.endswith(".pth"):
                (into / top).symlink_to(base / top)


@pytest.mark.slow
def test_the_documented_install_runs_the_search_with_the_gpu_machines_packages_alone(tmp_path):
    """gpu.md's second command, run as a command line: the wheels this script writes (for this Python),
    installed with ``pip --target``, run the search from the checkout on PYTHONPATH in a Python that sees
    none of this machine's site-packages (``-S``) but the packages the GPU machines ship (linked into a
    folder of their own, last on PYTHONPATH). The preset shrunk to seconds, on the CPU."""
    script = load_script()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    try:
        script.download(script.needed(version), workdir / ".whl", version)
    except SystemExit as e:  # pragma: no cover - a machine without the package index
        pytest.skip(f"no package index: {e}")
    (workdir / "fulu_nas").symlink_to(ROOT / "fulu_nas")
    machine, site = tmp_path / "machine", tmp_path / "site"
    _link_the_gpu_machines_packages(script, machine, version)
    hidden = subprocess.run([sys.executable, "-S", "-c", "import optuna"], env={"PYTHONPATH": str(machine)},
                            capture_output=True, text=True)
    assert hidden.returncode != 0 and "No module named 'optuna'" in hidden.stderr  # the stack only from the wheels

    documented = next(line for line in (ROOT / "docs" / "gpu.md").read_text().splitlines()
                      if line.startswith("python3 -m pip install") and "--target /tmp/site" in line)
    command = (documented.replace("/tmp/site", str(site))
               .replace("python3 -m pip", f"{sys.executable} -m pip")
               .replace(f"PYTHONPATH={site}:$PWD python3 -m fulu_nas",
                        f"PYTHONPATH={site}:$PWD:{machine} {sys.executable} -S -m fulu_nas"))
    assert command.count(str(machine)) == 1 and command.count(" -S -m fulu_nas search +experiment=gpu") == 1
    shrunk = ("trainer.device=cpu study.n_trials=2 study.startup_trials=1 trainer.steps=3 trainer.report_every=1 "
              "trainer.batch_size=4 task.seq_len=32 'trainer.cost_shapes=[[1,32]]' trainer.cost_iterations=2 "
              f"trainer.cost_rounds=1 hydra.run.dir={tmp_path / 'run'}")
    done = subprocess.run(["bash", "-c", f"{command} {shrunk}"], cwd=workdir, capture_output=True, text=True,
                          timeout=900, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Best trial of study gpu-textlm (2 complete" in done.stdout
    where = subprocess.run([sys.executable, "-S", "-c", "import optuna, mlflow, hydra; print(optuna.__file__, "
                            "mlflow.__file__, hydra.__file__)"], env={"PYTHONPATH": f"{site}:{machine}"},
                           capture_output=True, text=True)
    assert where.returncode == 0 and all(p.startswith(str(site)) for p in where.stdout.split()), where

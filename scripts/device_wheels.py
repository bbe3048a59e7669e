"""Build the folder of wheels that lets a GPU machine without fulu-nas's search stack run the search.

    python3 scripts/device_wheels.py [--out .whl] [--python-version 3.12] [--dry-run]

The GPU machines this project is measured on ship torch, triton, numpy, pandas, scipy, pyyaml,
rich, tqdm, safetensors, transformers and the like, but not Optuna, Hydra or MLflow, and cannot
reach a package index. This script resolves what fulu-nas's search, confirmation and export need
(from the requirements of the packages installed here), drops what the machine already has, and
downloads the rest as binary wheels for the machine's Python into ``--out``. Pure-Python packages
published only as source (Hydra's ``antlr4-python3-runtime``) are built into wheels here.

MLflow travels as ``mlflow-skinny`` (tracking, models, registry) plus the SQL store's packages
(SQLAlchemy, Alembic): the full ``mlflow`` adds the tracking server and its UI (``fulu-nas ui``),
which a batch run on the GPU does not use, and would not fit a device call's 64 MiB.

On the GPU machine (wheels installed to a folder of their own, put first on PYTHONPATH):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

# What fulu-nas needs on the GPU machine beyond fulu_nas.moe (torch alone): the search (Optuna, Hydra),
# tracking and export (MLflow's client and SQL store), the dashboards' figures (plotly).
ROOTS = ("optuna", "hydra-core", "mlflow-skinny", "mlflow-tracing", "sqlalchemy", "alembic", "plotly")

# Packages the GPU machines' image already has (the device notes' package list, 2026-11-17): never carried,
# since two versions of one package stop the install and most of these are large (torch, numpy, pyarrow).
ON_DEVICE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_34_x86_64")

MAX_BYTES = 64 * 2**20  # what one device call carries, the working tree included


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(dist: metadata.Distribution, python_version: str) -> list[str]:
    """The names ``dist`` requires on CPython ``python_version``, x86-64 Linux, no extras."""
    env = {"python_version": python_version, "python_full_version": f"{python_version}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
    names = []
    for line in dist.requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(env):
            names.append(canonical(req.name))
    return names


def needed(python_version: str = "3.12", roots: tuple[str, ...] = ROOTS,
           on_device: frozenset[str] = ON_DEVICE) -> dict[str, str]:
    """``{package: version installed here}`` for ``roots`` and everything they need, less ``on_device``."""
    out: dict[str, str] = {}
    todo = [canonical(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in out or name in on_device:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            raise SystemExit(f"{name} is needed on the GPU machine but not installed here: pip install it first "
                             "(its version here is the one carried)") from e
        out[name] = dist.version
        todo.extend(_requirement_names(dist, python_version))
    return dict(sorted(out.items()))


def download(packages: dict[str, str], out: Path, python_version: str) -> list[Path]:
    """Binary wheels of ``packages`` for CPython ``python_version`` on x86-64 Linux, into ``out``; a package
    with no binary wheel is built here (pure Python only)."""
    out.mkdir(parents=True, exist_ok=True)
    platform_args = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, version in packages.items():
        spec = f"{name}=={version}"
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp", *platform_args, "-d", str(out), spec]
        if subprocess.run(command, capture_output=True, text=True).returncode != 0:
            with tempfile.TemporaryDirectory() as tmp:  # only a source release: build a wheel from it
                build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, spec],
                                       capture_output=True, text=True)
                built = list(Path(tmp).glob("*.whl"))
                if build.returncode != 0 or not built or not built[0].name.endswith("-py3-none-any.whl"):
                    raise SystemExit(f"no wheel of {spec} for CPython {python_version} on x86-64 Linux, and it is "
                                     f"not pure Python: {build.stderr.strip()[-500:]}")
                built[0].rename(out / built[0].name)
    return sorted(out.glob("*.whl"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--dry-run", action="store_true", help="list the packages, download nothing")
    args = parser.parse_args(argv)
    packages = needed(args.python_version)
    if args.dry_run:
        print("\n".join(f"{k}=={v}" for k, v in packages.items()))
        return 0
    wheels = download(packages, args.out, args.python_version)
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {args.out}")
    if size > MAX_BYTES:
        print(f"more than a device call carries ({MAX_BYTES // 2**20} MiB)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

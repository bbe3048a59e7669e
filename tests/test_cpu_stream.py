"""The CPU streaming experts kernel (fulu_nas.moe.cpu_stream): equal to a plain per-expert FFN for
every layout edge (row tiles, padded widths, biases, idle experts), taken by the layer for few rows
per expert, and replaced by oneDNN with one warning where it cannot be built."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fulu_nas.moe import GroupedExperts, cpu_packed, cpu_stream

from .helpers import make_layer

# CI installs a C++ compiler, so there the kernel must build; elsewhere it may be missing.
pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="no C++ compiler to build the kernel")


def reference(x_ND, counts, w13_EDW, b13_EW, w2_EFD, b2_ED, weight_N, swiglu):
    """Each expert as a plain FFN in float64, rows sorted by expert."""
    outs = []
    rows = x_ND.double().split(counts)
    scales = weight_N.double().split(counts) if weight_N is not None else [None] * len(counts)
    for e, (x, s) in enumerate(zip(rows, scales, strict=True)):
        h = x @ w13_EDW[e].double() + (b13_EW[e].double() if b13_EW is not None else 0)
        act = F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1] if swiglu else F.gelu(h)
        y = act @ w2_EFD[e].double() + (b2_ED[e].double() if b2_ED is not None else 0)
        outs.append(y if s is None else y * s[:, None])
    return torch.cat(outs)


CASES = {
    # hidden, width, counts: a tile of 6 rows and a remainder, idle experts, one row, widths that
    # are not whole panels (D=72: two output panels, the second partial; F=40 padded to 64).
    "seed_like": (64, 96, [6, 6, 5, 4, 4, 1, 1, 5]),
    "tiles_and_idle": (64, 64, [13, 0, 7, 0, 1]),
    "partial_panels": (72, 40, [3, 9, 2]),
    "one_row": (128, 32, [1]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("swiglu", [True, False], ids=["swiglu", "gelu"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_kernel_equals_plain_experts(case, swiglu, bias, weighted):
    D, Fw, counts = CASES[case]
    E, N = len(counts), sum(counts)
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, D, 2 * Fw if swiglu else Fw, generator=g) / D**0.5
    w2 = torch.randn(E, Fw, D, generator=g) / Fw**0.5
    b13 = torch.randn(E, w13.shape[2], generator=g) if bias else None
    b2 = torch.randn(E, D, generator=g) if bias else None
    x = torch.randn(N, D, generator=g)
    weight = torch.rand(N, generator=g) if weighted else None
    panels = cpu_stream.pack(w13, b13, w2, swiglu)
    out = cpu_stream.experts(x, counts, panels, b2, weight, swiglu)
    assert out.shape == (N, D) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(x, counts, w13, b13, w2, b2, weight, swiglu),
                               rtol=1e-5, atol=1e-5)


def test_panel_layout():
    """SwiGLU panels interleave 32 gate and 32 up columns; panels are stored panel-major."""
    E, D, Fw = 2, 3, 64
    w13 = torch.arange(E * D * 2 * Fw, dtype=torch.float32).view(E, D, 2 * Fw)
    panels = cpu_stream.pack(w13, None, torch.zeros(E, Fw, D), swiglu=True)
    assert panels.w13_PEDB.shape == (2, E, D, 64)
    assert torch.equal(panels.w13_PEDB[1, 0, 2, :32], w13[0, 2, 32:64])  # gate columns 32..63
    assert torch.equal(panels.w13_PEDB[1, 0, 2, 32:], w13[0, 2, 96:128])  # up columns 32..63
    assert panels.w2_PEFB.shape == (1, E, Fw, 64)  # D=3 padded to one panel of 64 columns
    assert panels.w2_PEFB[..., 3:].abs().sum() == 0


def test_applies_to_few_rows_per_active_expert():
    limit = cpu_stream.MAX_MEAN_ROWS
    assert cpu_stream.applies([limit, limit, 0, 0])
    assert not cpu_stream.applies([limit + 1, limit, 0, 0])
    assert not cpu_stream.applies([0, 0])


@pytest.fixture
def paths_taken(monkeypatch) -> list[str]:
    """Which CPU expert path each packed call took."""
    taken: list[str] = []
    stream, onednn = cpu_stream.experts, cpu_packed.linear

    def spy_stream(*args, **kwargs):
        taken.append("stream")
        return stream(*args, **kwargs)

    def spy_onednn(*args, **kwargs):
        taken.append("onednn")
        return onednn(*args, **kwargs)

    def spy_chunked(*args, **kwargs):
        taken.append("chunked")
        return chunked(*args, **kwargs)

    chunked = GroupedExperts._forward_chunked
    monkeypatch.setattr(cpu_stream, "experts", spy_stream)
    monkeypatch.setattr(cpu_packed, "linear", spy_onednn)
    monkeypatch.setattr(GroupedExperts, "_forward_chunked", spy_chunked)
    return taken


@pytest.mark.parametrize("tokens, path", [(4, "stream"), (400, "chunked")])
def test_layer_takes_the_kernel_for_few_rows(tokens, path, paths_taken):
    """8 experts, top-2: 4 tokens are 1 row per expert (the kernel), 400 are 100 (these small
    experts: grouped GEMMs in chunks); both equal the per-expert loop."""
    layer = make_layer("topk", activation="gelu", expert_bias=True).eval()
    torch.nn.init.normal_(layer.experts.b13_EF2)
    torch.nn.init.normal_(layer.experts.b2_ED)
    x = torch.randn(tokens, 32)
    with torch.inference_mode():
        fast, ref = layer(x)[0], layer(x, impl="loop")[0]
    assert set(paths_taken) == {path}
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_layer_panels_follow_weight_updates(paths_taken):
    """The packed panels are made again after an optimizer step changes the weights in place."""
    layer = make_layer("topk")
    x = torch.randn(8, 32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for _ in range(2):
        layer.eval()
        with torch.inference_mode():
            torch.testing.assert_close(layer(x)[0], layer(x, impl="loop")[0], rtol=1e-5, atol=1e-5)
        layer.train()
        out, stats = layer(x)
        (out.square().sum() + stats["balance_loss"]).backward()
        opt.step()
    assert paths_taken == ["stream", "stream"]


@pytest.fixture
def fresh_kernel_load():
    """The kernel loaded anew by the test (and again by later tests, from the built library)."""
    cpu_stream._loaded.cache_clear()
    yield
    cpu_stream._loaded.cache_clear()


def test_without_the_kernel_the_chunks_serve_and_one_warning_says_why(monkeypatch, fresh_kernel_load, paths_taken):
    def no_compiler():
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpu_stream, "_build", no_compiler)
    layer = make_layer("topk").eval()
    x = torch.randn(4, 32)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        fast = layer(x)[0]
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not per call
        again = layer(x)[0]
        ref = layer(x, impl="loop")[0]
    assert set(paths_taken) == {"chunked"}  # these experts are small (oneDNN takes large ones)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)


def test_switched_off_by_the_environment(monkeypatch, paths_taken):
    monkeypatch.setenv("FULU_NAS_CPU_STREAM", "0")
    assert cpu_stream.kernel() is None
    layer = make_layer("topk").eval()
    with torch.inference_mode():
        layer(torch.randn(4, 32))
    assert set(paths_taken) == {"chunked"}


def test_grouped_experts_module_uses_it_directly():
    """GroupedExperts.forward_grouped (not only through the layer) takes the kernel on the CPU."""
    torch.manual_seed(0)
    experts = GroupedExperts(make_layer("topk").cfg).eval()
    counts = [2, 0, 1, 3, 0, 0, 1, 1]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert_N = torch.repeat_interleave(torch.arange(8), torch.tensor(counts))
    x, w = torch.randn(8, 32), torch.rand(8)
    with torch.inference_mode():
        out = experts.forward_grouped(x, offsets, expert_N, w)
        ref = torch.cat([experts.expert(e, rows) for e, rows in enumerate(x.split(counts))]) * w[:, None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_panels_start_on_huge_page_boundaries():
    """Panels of 2 MB or more are allocated at a 2 MB boundary (advised as huge pages) and hold the
    values copied in; small ones are ordinary tensors."""
    w = torch.randn(4, 256, 1024)  # 4 MB
    panels = cpu_stream._panels(w)
    assert panels.data_ptr() % (2 << 20) == 0 and panels.is_contiguous()
    assert torch.equal(panels, w.reshape(4, 256, 16, 64).permute(2, 0, 1, 3))
    w_small = torch.randn(2, 8, 64)
    assert torch.equal(cpu_stream._panels(w_small), w_small[None])


def _checkout(root: Path, comment: str | None = None) -> Path:
    """A copy of the fulu_nas package under ``root`` (another checkout on the same machine), with
    ``comment`` added to the kernel's source when given (another version of it)."""
    package = Path(cpu_stream.__file__).parents[1]
    shutil.copytree(package, root / "fulu_nas", ignore=shutil.ignore_patterns("__pycache__"))
    if comment is not None:
        source = root / "fulu_nas" / "moe" / "csrc" / "cpu_stream.cpp"
        source.write_text(f"// {comment}\n" + source.read_text())
    return root


def _load_kernel_from(checkout: Path, extensions: Path) -> None:
    """Load the kernel in a fresh process that imports fulu_nas from ``checkout``."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "TORCH_EXTENSIONS_DIR": str(extensions)}
    env.pop("FULU_NAS_CPU_STREAM", None)
    code = ("import sys; from fulu_nas.moe import cpu_stream; "
            "assert cpu_stream.__file__.startswith(sys.argv[1]), cpu_stream.__file__; "
            "assert cpu_stream.kernel() is not None")
    result = subprocess.run([sys.executable, "-c", code, str(checkout)], env=env, capture_output=True, text=True,
                            cwd=checkout)
    assert result.returncode == 0, result.stderr[-3000:]


def _built_libraries(extensions: Path) -> dict[Path, int]:
    return {so: so.stat().st_mtime_ns for so in extensions.rglob("*.so")}


@pytest.mark.slow
def test_each_kernel_source_has_its_own_build_and_reuses_it(tmp_path):
    """Two versions of the kernel's source on one machine build once each, in their own folders, and
    the same source (in another checkout too) loads the build it already has."""
    extensions = tmp_path / "torch_extensions"
    first, changed = _checkout(tmp_path / "a"), _checkout(tmp_path / "b", comment="another version")
    same = _checkout(tmp_path / "c")

    _load_kernel_from(first, extensions)
    built = _built_libraries(extensions)
    assert len(built) == 1

    _load_kernel_from(changed, extensions)
    both = _built_libraries(extensions)
    assert len(both) == 2 and len({so.parent for so in both}) == 2
    assert {so: both[so] for so in built} == built, "the other source's build was rebuilt or replaced"

    _load_kernel_from(same, extensions)
    _load_kernel_from(first, extensions)
    _load_kernel_from(changed, extensions)
    assert _built_libraries(extensions) == both, "a source that was built already was built again"


def test_the_ninja_fulu_nas_installs_builds_the_kernel_without_the_environment_on_path(tmp_path):
    """torch looks for ninja on PATH alone, and pip puts the ninja package's beside the interpreter: a fulu-nas run
    by its full path without activating its environment (pipx, cron) skipped the kernel, warning to
    "pip install ninja", which was installed."""
    import ninja

    system = tmp_path / "bin"  # the system's programs (the compiler), less any ninja of its own
    system.mkdir()
    for folder in ("/usr/local/bin", "/usr/bin", "/bin"):
        for program in Path(folder).iterdir() if Path(folder).is_dir() else ():
            if program.name != "ninja" and not (system / program.name).exists():
                (system / program.name).symlink_to(program)
    assert Path(ninja.BIN_DIR, "ninja").exists()
    env = {**os.environ, "PATH": str(system)}
    env.pop("FULU_NAS_CPU_STREAM", None)
    code = "from fulu_nas.moe import cpu_stream; assert cpu_stream.kernel() is not None"
    result = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code], env=env, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_build_name_follows_the_source_and_flags():
    source = cpu_stream._SOURCE.read_bytes()
    flags = ["-O3", "-mavx2"]
    name = cpu_stream.build_name(source, "AVX2", flags)
    assert cpu_stream.build_name(bytes(source), "AVX2", list(flags)) == name
    assert cpu_stream.build_name(b"// another version\n" + source, "AVX2", flags) != name
    assert cpu_stream.build_name(source, "AVX2", ["-O2", "-mavx2"]) != name
    assert cpu_stream.build_name(source, "AVX512", flags) != name

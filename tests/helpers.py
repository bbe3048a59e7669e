"""Small layers of every router, seeded: shared by the tests."""

from __future__ import annotations

import socket
from collections.abc import Callable
from contextlib import contextmanager

import torch

from fulu_nas.moe import MoEConfig, PiMoELayer

# Router-specific settings that make each router exercise its distinctive machinery.
ROUTER_EXTRAS = {
    "topk": {},
    "expert_choice": {},
    "hash": {},
    "hierarchical": {"hierarchy_depth": 2},
    "attention": {"attention_heads": 4, "attention_context": True},
}


def make_config(router: str = "topk", **overrides) -> MoEConfig:
    kw = dict(hidden_size=32, num_experts=8, expert_ffn_size=48, top_k=2, router=router)
    kw.update(ROUTER_EXTRAS[router])
    kw.update(overrides)
    return MoEConfig(**kw)


def make_layer(router: str = "topk", seed: int = 0, **overrides) -> PiMoELayer:
    torch.manual_seed(seed)
    return PiMoELayer(make_config(router, **overrides))


@contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the duration of the ``with``."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weights_trained_with_threads(train_once: Callable[[], torch.nn.Module],
                                 counts: tuple[int, ...] = (2, 2, 1)) -> list[dict[str, torch.Tensor]]:
    """The parameters of the module ``train_once()`` returns, called after ``torch.manual_seed(0)`` with
    each thread count of ``counts``."""
    weights = []
    for n in counts:
        with torch_threads(n):
            torch.manual_seed(0)
            weights.append({k: v.detach().clone() for k, v in train_once().named_parameters()})
    return weights


def assert_compiled_trains_as_eager(layer: PiMoELayer, x: torch.Tensor, read_stats: bool = True, rtol: float = 1e-4,
                                    atol: float = 1e-6) -> None:
    """Inductor's compiled ``layer`` gives every parameter the eager layer's gradient (nonzero) for the
    loss ``out^2`` (plus the balance loss when ``read_stats``)."""
    grads = []
    for fn in (layer, torch.compile(layer, fullgraph=True)):
        layer.zero_grad()
        out, stats = fn(x)
        (out.square().mean() + (stats["balance_loss"] if read_stats else 0)).backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None})
    eager, compiled = grads
    assert eager.keys() == compiled.keys() and "experts.w2_EFD" in eager
    for name in eager:
        assert eager[name].abs().sum() > 0, name
        torch.testing.assert_close(compiled[name], eager[name], rtol=rtol, atol=atol, msg=name)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for servers and process groups in tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port``, binding as uvicorn does (SO_REUSEADDR: the
    connections of a server just stopped may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (from /proc: a zombie has ended, only its exit status is left)."""
    from pathlib import Path

    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def kill_leftovers(pids) -> None:
    """SIGKILL to each of ``pids`` (what a test started) that still runs: a failed test leaves no server."""
    import os
    import signal

    for pid in pids:
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def spawn_ranks(worker, nprocs: int, out_dir) -> list[dict]:
    """Run ``worker(rank, port, out_dir)`` in ``nprocs`` processes; each saves ``rank{r}.pt``."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=nprocs, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def flip_last_byte(path, mask: int = 0xFF) -> None:
    """Tamper with the file at ``path``: its last byte XOR ``mask``."""
    data = bytearray(path.read_bytes())
    data[-1] ^= mask
    path.write_bytes(bytes(data))


# Routing-kernel cases: (tokens, experts, top_k, router options); the interpreter runs the small ones.
ROUTE_CASES = {
    "softmax": (37, 8, 2, {}),
    "one_token": (1, 8, 2, {}),
    "top_p_k3": (50, 6, 3, {"top_p": 0.6}),
    "sigmoid_scaled": (40, 20, 4, {"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.5}),
    "many_blocks": (300, 8, 2, {}),
    "fine_grained": (70, 128, 8, {}),
    # logits with fp32 accuracy at the most experts that take them, one program sorting its slots
    "few_tokens_32_experts": (16, 32, 4, {}),
    # one program whose slots x experts do not fit the counting sort's tile: sorted by argsort
    "top16_of_256": (16, 256, 16, {}),
    # equal scores (given logits on a coarse grid, no bias; rows with fewer finite logits than
    # slots): ties go to the lower expert, as torch.topk's stable order gives them
    "ties": (48, 16, 4, {"ties": True}),
}


def routing_kernel_mismatches(tokens: int, experts: int, k: int, options: dict, device: str,
                              dtype: torch.dtype, seed: int = 0) -> list[str]:
    """What differs between the Triton routing kernel with its counting sort and the torch ops
    they replace (:func:`select_experts` on the kernel's logits, the stable argsort, bincount),
    for the logits given and, where the kernel computes them itself, for ``x`` and the gate."""
    from fulu_nas.moe import triton_routing
    from fulu_nas.moe.experts import inverse_permutation, sort_by_expert
    from fulu_nas.moe.routing import normalised_probs, scores_from_logits, select_experts

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(tokens, 96, device=device, generator=gen).to(dtype)
    gate = torch.randn(experts, 96, device=device, generator=gen) / 10
    bias = torch.randn(experts, device=device, generator=gen) * 0.05
    score, renorm = options.get("score_func", "softmax"), options.get("renormalize", True)
    scaling, top_p = options.get("routed_scaling_factor", 1.0), options.get("top_p")
    logits = x.float() @ gate.t()
    ties = options.get("ties", False)
    if ties:
        logits = (logits * 20).round() / 2
        logits[:3, 2:] = float("-inf")  # two finite scores, the other slots among zeros
        logits[3:6, ::3] = logits[3:6, :1]  # one score at every third expert
        bias = torch.zeros_like(bias)
    problems = []
    mode = triton_routing.logits_in_kernel(x, experts)
    for given in (logits, None) if mode and not ties else (logits,):
        how = "given logits" if given is not None else f"logits mode {mode}"
        r = triton_routing.launch_route(given, x, gate, bias, k, score, renorm, scaling, top_p)
        if not torch.allclose(r.logits_TE, logits, rtol=1e-4, atol=1e-4):
            problems.append(f"{how}: logits")
        scores = scores_from_logits(r.logits_TE, score)
        expert, weight, active = select_experts(scores, scores + bias, k, renormalize=renorm, scaling=scaling,
                                                top_p=top_p)
        flat = expert.reshape(-1)
        # The counting sort where the layer would run it (else the layer takes torch's argsort).
        sorts = [triton_routing.launch_place(flat, r.counts_BE, r.rows_per_block)] \
            if triton_routing.place_usable(r.counts_BE, r.rows_per_block) else []
        if r.sorted_slots is not None:  # one program: the routing kernel sorted them too
            sorts.append(r.sorted_slots)
        checks = {
            "experts": torch.equal(r.expert_TK, expert),
            "weights": torch.allclose(r.weight_TK, weight, rtol=1e-5, atol=1e-6),
            "active": torch.equal(r.active_TK, active),
            "probs": torch.allclose(r.probs_TE, normalised_probs(scores, score), rtol=1e-5, atol=1e-7),
            "counts": torch.equal(r.counts_BE.sum(0).long(), torch.bincount(flat, minlength=experts)),
        }
        if sorts:
            order, ends, inverse = (torch.stack([s[i].long() for s in sorts]) for i in (0, 1, 2))
            checks |= {
                "order": (order == sort_by_expert(flat, experts)).all().item(),
                "ends": (ends == torch.bincount(flat, minlength=experts).cumsum(0)).all().item(),
                "inverse": (inverse == inverse_permutation(sort_by_expert(flat, experts))).all().item(),
            }
        problems += [f"{how}: {name}" for name, ok in checks.items() if not ok]
    return problems


@contextmanager
def read_only_copy(source, where):
    """A copy of the folder ``source`` at ``where`` on a read-only file system (a tmpfs mounted,
    filled, then remounted read-only): as root, permissions refuse nothing. Skips the test where
    mounting is not allowed."""
    import shutil
    import subprocess

    import pytest

    where.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("needs to mount a tmpfs (root with CAP_SYS_ADMIN)")
    try:
        shutil.copytree(source, where, dirs_exist_ok=True)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True, capture_output=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)

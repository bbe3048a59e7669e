"""Experts: E feed-forward networks stored as stacked 3-D weights, and dense FFNs.

Shape suffixes: N dispatched rows (sorted by expert), T tokens, D hidden, F expert width,
E experts. ``w13_EDF2`` holds SwiGLU's gate (first F columns) and up (last F) projections side by
side so one grouped GEMM computes both; for GELU it is ``w13_EDF``.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_packed, cpu_stream
from .config import MoEConfig

# torch >= 2.10 exposes the public op; older releases only the private one (same semantics).
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def _admit_fp32_in_grouped_mm_meta() -> None:
    """Let torch.compile / torch.export trace fp32 grouped GEMMs.

    The CPU kernel of ``aten._grouped_mm`` computes fp32 (torch >= 2.9), but its meta kernel,
    which tracing runs on fake tensors, still admits bf16 only. We keep torch's meta for bf16
    and compute the output shape with torch's own helper otherwise. The traced graph holds the
    plain aten op, so exported programs still load with torch alone.
    """
    try:
        from torch._decomp import meta_table
        from torch._meta_registrations import _create_grouped_mm_output_tensor
    except ImportError:  # a torch whose internals moved: fp32 tracing stays unsupported
        return
    op = torch.ops.aten._grouped_mm.default
    bf16_meta = meta_table.get(op)
    if bf16_meta is None or getattr(bf16_meta, "_fulu_fp32", False):
        return

    def meta(mat_a, mat_b, offs=None, bias=None, out_dtype=None):
        if mat_a.dtype == torch.bfloat16:
            return bf16_meta(mat_a, mat_b, offs=offs, bias=bias, out_dtype=out_dtype)
        torch._check(mat_a.dtype == mat_b.dtype, lambda: "grouped_mm operands must share a dtype")
        return _create_grouped_mm_output_tensor(mat_a, mat_b, offs, out_dtype)

    meta._fulu_fp32 = True
    meta_table[op] = meta
    op.py_kernels[torch._C.DispatchKey.Meta] = meta
    op._dispatch_cache.clear()


_admit_fp32_in_grouped_mm_meta()


def grouped_mm(x_ND: Tensor, w_EXY: Tensor, offsets_E: Tensor) -> Tensor:
    """Row block e of ``x`` (rows offsets[e-1]:offsets[e]) times ``w[e]``, in one kernel."""
    return _grouped_mm(x_ND, w_EXY.to(x_ND.dtype), offs=offsets_E)


@functools.cache
def grouped_mm_captures(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a CUDA graph can capture :func:`grouped_mm` in ``dtype`` on the CUDA ``device``. Where
    torch has no grouped kernel for the dtype on the device (fp32 on an H100 with torch 2.11), it
    loops over the groups with their offsets copied to the host, which a capture refuses. Found by
    capturing one small call (the refusal comes before anything runs: the process's CUDA state is
    left as it was)."""
    with torch.cuda.device(device):
        x = torch.zeros(16, 16, device=device, dtype=dtype)
        w = torch.zeros(2, 16, 16, device=device, dtype=dtype)
        offsets = torch.tensor([8, 16], device=device, dtype=torch.int32)
        grouped_mm(x, w, offsets)  # the library's first call initialises outside the capture
        torch.cuda.synchronize(device)
        # A refused capture ends with torch's "The CUDA Graph is empty" warning: not the user's concern.
        # thread_local: a search trial probes while a thread of its own compiles the served forward's kernels
        # on another stream, whose calls must neither fail nor spoil this capture (an answer kept for good).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                with torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
                    grouped_mm(x, w, offsets)
            except RuntimeError:
                return False
    return True


def sort_by_expert(expert_N: Tensor, num_experts: int) -> Tensor:
    """The stable argsort of the expert ids (each expert's rows stay in slot order: the capacity
    priority). The keys take the narrowest integer type that holds them: the GPU radix sort makes
    one pass per key byte (H200, 262,144 keys: uint8 0.024 ms, int16 0.033, int32 0.051)."""
    key = torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2**15 else torch.int32
    return torch.argsort(expert_N.to(key), stable=True)


def group_ends(expert_sorted_N: Tensor, num_experts: int) -> Tensor:
    """Where each expert's rows end in ids sorted by expert: a binary search of the sorted ids (no
    atomics)."""
    return torch.searchsorted(expert_sorted_N, torch.arange(1, num_experts + 1, device=expert_sorted_N.device))


def inverse_permutation(order_N: Tensor) -> Tensor:
    """``inverse[order[n]] = n`` for a permutation ``order`` of ``0..N-1``."""
    return torch.empty_like(order_N).index_put_((order_N,), torch.arange(order_N.shape[0], device=order_N.device))


def _add_slots(rows_ND: Tensor, inverse_N: Tensor, k: int) -> Tensor:
    """``out[t] = sum_j rows[inverse[t*k + j]]`` in slot order, in fp32 (float64 rows in float64)."""
    inverse_TK = inverse_N.view(-1, k)
    acc = torch.promote_types(rows_ND.dtype, torch.float32)
    out_TD = rows_ND[inverse_TK[:, 0]].to(acc)
    for j in range(1, k):
        out_TD = out_TD + rows_ND[inverse_TK[:, j]].to(acc)
    return out_TD


class _SumSlots(torch.autograd.Function):
    """:func:`sum_slots` with the gradient of row n read from its token, ``grad[order[n] // k]``: a
    gather, where autograd's backward of the gathers would scatter-add into zeros (``index_put_``
    with accumulation: several times a gather on the CPU, a sort on a GPU with deterministic
    algorithms)."""

    @staticmethod
    def forward(rows_ND: Tensor, order_N: Tensor, inverse_N: Tensor, k: int) -> Tensor:
        return _add_slots(rows_ND, inverse_N, k)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        rows_ND, order_N, _, ctx.k = inputs
        ctx.rows_dtype = rows_ND.dtype
        ctx.save_for_backward(order_N)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        (order_N,) = ctx.saved_tensors
        return grad_TD[order_N // ctx.k].to(ctx.rows_dtype), None, None, None


class _TokenRows(torch.autograd.Function):
    """:func:`token_rows` with the gradient of token t the sum of its k rows' gradients, gathered
    through the inverse permutation (:func:`_add_slots`, in fp32), where autograd would scatter-add
    them (see :class:`_SumSlots`)."""

    @staticmethod
    def forward(x_TD: Tensor, order_N: Tensor, inverse_N: Tensor, k: int) -> Tensor:
        return x_TD[order_N // k]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x_TD, _, inverse_N, ctx.k = inputs
        ctx.x_dtype = x_TD.dtype
        ctx.save_for_backward(inverse_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (inverse_N,) = ctx.saved_tensors
        return _add_slots(grad_ND, inverse_N, ctx.k).to(ctx.x_dtype), None, None, None


def sum_slots(rows_ND: Tensor, order_N: Tensor, k: int, inverse_N: Tensor | None = None) -> Tensor:
    """Rows sorted by expert back to tokens: row n holds flat slot ``order[n]`` (token
    ``order[n] // k``); each token's k rows are gathered through the inverse permutation (given, or
    computed here) and added in fp32, in slot order (deterministic, no atomics; under torch.compile
    one pointwise kernel with k coalesced row loads). Returns (N // k, D) in fp32 (float64 for
    float64 rows). Its backward
    gathers too (:class:`_SumSlots`)."""
    inverse_N = inverse_permutation(order_N) if inverse_N is None else inverse_N
    if _gather_backward(rows_ND):
        return _SumSlots.apply(rows_ND, order_N, inverse_N, k)
    return _add_slots(rows_ND, inverse_N, k)


def token_rows(x_TD: Tensor, order_N: Tensor, k: int, inverse_N: Tensor | None = None) -> Tensor:
    """``x[order // k]``: each dispatched row's token, in sorted order (row n holds flat slot
    ``order[n]``). The adjoint of :func:`sum_slots`: its backward adds each token's k row gradients
    by gathers through the inverse permutation (given, or computed here where a gradient is
    needed) (:class:`_TokenRows`)."""
    if _gather_backward(x_TD):
        return _TokenRows.apply(x_TD, order_N, inverse_permutation(order_N) if inverse_N is None else inverse_N, k)
    return x_TD[order_N // k]


def _gather_backward(t: Tensor) -> bool:
    """Whether a gradient flows through ``t`` in an eager call or a compiled one on the CPU: there the
    gather backwards replace autograd's. A compiled GPU step keeps autograd's, which Inductor generates
    itself: with the gather backwards, the trainer's compiled bf16 step on an H200 trained away from the
    eager one (2026-12-04, ``tests/test_cuda.py::test_compiled_training_step_trains_like_the_eager_one_on_cuda``).
    On the CPU, Inductor (torch 2.13) scheduled autograd's scatter-add after the kernel that read its
    result in a layer with GELU, expert biases and a z-loss: every gradient through the experts was zero
    (``tests/test_compile_export.py::test_inductor_trains_as_the_eager_layer``); with the gathers the
    CPU's compiled step matches the eager one."""
    return torch.is_grad_enabled() and t.requires_grad and (not torch.compiler.is_compiling()
                                                            or t.device.type == "cpu")


def as_contiguous(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype).contiguous()``, but ``t`` itself without a dispatch where it already is one
    (each dispatch is host time that a small eager call waits on)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def needs_grad(module: nn.Module, *inputs: Tensor | None) -> bool:
    """Whether a call of ``module`` on ``inputs`` (``None`` entries skipped) builds an autograd graph."""
    return torch.is_grad_enabled() and (any(t is not None and t.requires_grad for t in inputs)
                                        or any(p.requires_grad for p in module.parameters()))


def activate(h_NF: Tensor, activation: str, scale_N1: Tensor | None = None) -> Tensor:
    """GELU(h) or SwiGLU (silu(gate) * up, gate and up side by side in h), times ``scale_N1``.

    Without autograd the products are taken in place on the fresh activation: on the CPU the
    out-of-place products over the strided halves of a large h cost more than the GEMMs around
    them (measured 105 vs 25 ms per forward at 4096 tokens, seed config)."""
    if activation == "swiglu":
        gate, up = h_NF.chunk(2, dim=-1)
        act = F.silu(gate)
        other = up
    else:
        act, other = F.gelu(h_NF), None
    scale_grad = scale_N1 is not None and scale_N1.requires_grad
    if torch.is_grad_enabled() and (h_NF.requires_grad or scale_grad):
        act = act * other if other is not None else act
        return act * scale_N1 if scale_N1 is not None else act
    if other is not None:
        act.mul_(other)
    return act.mul_(scale_N1) if scale_N1 is not None else act


# fp32 inference on the CPU past the streaming kernel's rows per expert (GroupedExperts._forward_cpu):
# experts whose first weight has at least this many elements run one at a time through oneDNN with
# packed weights, smaller ones through torch's grouped GEMM in chunks of experts whose first GEMM
# writes at most CHUNK_ELEMENTS values. On a 2-core Xeon (the layer's call; BENCHMARKS.md, "The CPU
# experts past the streaming kernel") oneDNN's cost per call (about 10 us beyond the product, two an
# expert, plus an activation) made the default search space's layers (hidden 64) 1.13-1.97x slower
# than the chunks; for the seed layer's experts (hidden 512 x 2,048: 2^20 elements) the two are
# within noise. One grouped GEMM pair for all experts loses where its temporaries pass a few MB:
# glibc returns them to the system after each call and the next faults them back in.
ONEDNN_MIN_WEIGHT = 2**20
CHUNK_ELEMENTS = 2**18


def _uniform_(t: Tensor, fan_in: int) -> Tensor:
    # nn.Linear's default scale: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / math.sqrt(fan_in)
    return nn.init.uniform_(t, -bound, bound)


class GroupedExperts(nn.Module):
    """E experts with stacked weights; computed by grouped GEMM, sorted matmuls or a loop."""

    # Biases, though stacked into matrices: a trainer's weight decay leaves them out (an upcycled dense
    # FFN's 1-D bias, undecayed there, becomes one row of them).
    no_weight_decay_params = ("b13_EF2", "b2_ED")

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        # A load writes the weights in place: their packed CPU copies go (see cpu_packed.forget).
        self.register_load_state_dict_post_hook(cpu_packed.forget)
        E, D, Fw = cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size
        self.activation = cfg.activation
        width = 2 * Fw if cfg.activation == "swiglu" else Fw
        self.w13_EDF2 = nn.Parameter(_uniform_(torch.empty(E, D, width), D))
        self.w2_EFD = nn.Parameter(_uniform_(torch.empty(E, Fw, D), Fw))
        if cfg.expert_bias:
            self.b13_EF2 = nn.Parameter(torch.zeros(E, width))
            self.b2_ED = nn.Parameter(torch.zeros(E, D))
        else:
            self.b13_EF2 = self.b2_ED = None

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cpu(), .to_empty() ... make new weights: the packed copies of the old ones go first
        # (under torch's swap_module_params_on_conversion their weak references made the swap fail)
        cpu_packed.forget(self)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        # The same before a load, which swaps the weights under that mode. Here rather than in a load pre-hook,
        # whose weak reference to the module a deep copy (expert parallelism's from_layer) keeps pointing at
        # the original.
        cpu_packed.forget(self)
        return super()._load_from_state_dict(*args, **kwargs)

    @property
    def num_experts(self) -> int:
        return self.w13_EDF2.shape[0]

    def expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e as a plain FFN (the reference every fast path is checked against)."""
        h = x_ND @ self.w13_EDF2[e].to(x_ND.dtype)
        if self.b13_EF2 is not None:
            h = h + self.b13_EF2[e].to(h.dtype)
        y = activate(h, self.activation) @ self.w2_EFD[e].to(x_ND.dtype)
        if self.b2_ED is not None:
            y = y + self.b2_ED[e].to(y.dtype)
        return y

    def forward_grouped(self, x_ND: Tensor, offsets_E: Tensor, expert_N: Tensor | None,
                        weight_N: Tensor | None) -> Tensor:
        """Rows sorted by expert (``offsets_E``: int32 cumulative counts), each output row scaled by
        its routing weight (``None``: unweighted); ``expert_N``: each row's expert (read with expert
        biases only). No host sync. The weight multiplies the activation (before the down
        projection, which is linear), where it fuses with the activation's elementwise pass. fp32
        inference on the CPU reads the counts on the host and takes the path measured fastest for
        them (:meth:`_forward_cpu`)."""
        if cpu_packed.applies(x_ND, needs_grad(self, x_ND, weight_N)):
            counts = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
            return self._forward_cpu(x_ND, counts, expert_N, weight_N)
        return self._grouped_gemms(x_ND, offsets_E, expert_N, weight_N)

    def _grouped_gemms(self, x_ND: Tensor, offsets_E: Tensor, expert_N: Tensor | None, weight_N: Tensor | None,
                       experts: slice = slice(None)) -> Tensor:
        """Both GEMMs of the experts ``experts`` by ``torch._grouped_mm`` (``offsets_E`` counted from
        the first of them; the biases are looked up by ``expert_N``, the global ids)."""
        h = grouped_mm(x_ND, self.w13_EDF2[experts], offsets_E)
        if self.b13_EF2 is not None:
            h = h + self.b13_EF2.to(h.dtype)[expert_N]
        w_N1 = None if weight_N is None else weight_N[:, None].to(h.dtype)
        y = grouped_mm(activate(h, self.activation, scale_N1=w_N1), self.w2_EFD[experts], offsets_E)
        if self.b2_ED is not None:
            b2 = self.b2_ED.to(y.dtype)[expert_N]
            y = y + (b2 if w_N1 is None else b2 * w_N1)
        return y

    def _forward_cpu(self, x_ND: Tensor, counts: list[int], expert_N: Tensor | None,
                     weight_N: Tensor | None) -> Tensor:
        """:meth:`forward_grouped` in fp32 inference on the CPU, with the rows per expert known on
        the host: a few rows per expert through the streaming kernel (:mod:`fulu_nas.moe.cpu_stream`),
        more through oneDNN with packed weights one expert at a time where the experts are large
        (:data:`ONEDNN_MIN_WEIGHT`), else through ``torch._grouped_mm`` in chunks of experts
        (:meth:`_forward_chunked`)."""
        swiglu = self.activation == "swiglu"
        if cpu_stream.applies(counts):
            panels = cpu_packed.cached(self, "stream", (self.w13_EDF2, self.b13_EF2, self.w2_EFD),
                                       lambda: cpu_stream.pack(self.w13_EDF2, self.b13_EF2, self.w2_EFD, swiglu))
            return cpu_stream.experts(x_ND, counts, panels, self.b2_ED, weight_N, swiglu)
        if self.w13_EDF2[0].numel() < ONEDNN_MIN_WEIGHT:
            return self._forward_chunked(x_ND, counts, expert_N, weight_N)
        packed = cpu_packed.cached(self, "onednn", (self.w13_EDF2, self.w2_EFD),
                                   lambda: cpu_packed.pack(self.w13_EDF2, self.w2_EFD))
        weights = weight_N.split(counts) if weight_N is not None else [None] * len(counts)
        outs = []
        for e, (x_e, w_e) in enumerate(zip(x_ND.split(counts), weights, strict=True)):
            if x_e.shape[0] == 0:
                continue
            w_e1 = None if w_e is None else w_e[:, None]
            h = cpu_packed.linear(x_e, packed.w13[e], self.b13_EF2[e].float() if self.b13_EF2 is not None else None)
            y = cpu_packed.linear(activate(h, self.activation, scale_N1=w_e1), packed.w2[e], None)
            if self.b2_ED is not None:
                y = y + (self.b2_ED[e] if w_e1 is None else self.b2_ED[e] * w_e1)
            outs.append(y)
        return torch.cat(outs) if outs else x_ND.new_zeros((0, self.w2_EFD.shape[2]))

    def _forward_chunked(self, x_ND: Tensor, counts: list[int], expert_N: Tensor | None,
                         weight_N: Tensor | None) -> Tensor:
        """:meth:`_grouped_gemms` over consecutive experts whose first GEMM writes at most
        :data:`CHUNK_ELEMENTS` values (an expert with more takes a chunk alone): two GEMM calls and
        an activation per chunk, and temporaries small enough for the allocator to reuse."""
        width = self.w13_EDF2.shape[2]
        chunks = [[0, 0, 0]]  # [first expert, end, rows] of each chunk
        for e, count in enumerate(counts):
            last = chunks[-1]
            if last[2] and (last[2] + count) * width > CHUNK_ELEMENTS:
                last = [e, e, 0]
                chunks.append(last)
            last[1], last[2] = e + 1, last[2] + count
        outs, start = [], 0
        for a, b, n in chunks:
            if n == 0:
                continue
            rows_n = slice(start, start + n)
            offsets = torch.tensor(counts[a:b], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            outs.append(self._grouped_gemms(x_ND[rows_n], offsets, None if expert_N is None else expert_N[rows_n],
                                            None if weight_N is None else weight_N[rows_n], slice(a, b)))
            start += n
        if not outs:
            return x_ND.new_zeros((0, self.w2_EFD.shape[2]))
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def forward_sorted(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """Rows sorted by expert, one matmul pair per expert (reads the counts on the host)."""
        chunks = x_ND.split(counts_E.tolist())
        return torch.cat([self.expert(e, rows) for e, rows in enumerate(chunks)])

    def forward_loop(self, x_TD: Tensor, expert_N: Tensor, token_N: Tensor, weight_N: Tensor) -> Tensor:
        """Unsorted reference: for each expert, mask its rows, compute, weighted scatter-add."""
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for e in range(self.num_experts):
            rows = expert_N == e
            tokens = token_N[rows]
            y = self.expert(e, x_TD[tokens])
            out_TD.index_add_(0, tokens, y.float() * weight_N[rows, None])
        return out_TD.to(x_TD.dtype)


class FeedForward(nn.Module):
    """A dense FFN (GELU or SwiGLU): the shared experts, and the dense-GEMM ceiling in benchmarks.

    ``n`` shared experts of width F are one FFN of width n*F: their summed outputs are exactly
    the output of the concatenated weights.
    """

    def __init__(self, hidden: int, width: int, activation: str, bias: bool = False):
        super().__init__()
        self.activation = activation
        self.w13 = nn.Linear(hidden, 2 * width if activation == "swiglu" else width, bias=bias)
        self.w2 = nn.Linear(width, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return linear_as_input(activate(linear_as_input(x, self.w13), self.activation), self.w2)


def linear_as_input(x: Tensor, linear: nn.Linear) -> Tensor:
    """``linear(x)`` in ``x``'s dtype, as the routed experts compute (their weights cast to the input's):
    a float32 layer's shared experts take bfloat16 or float64 input as its routed ones do."""
    bias = linear.bias
    return F.linear(x, linear.weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


class SharedExperts(nn.Module):
    """Always-on experts whose output is added to the routed output; optional sigmoid gate
    per token (Qwen2-MoE's ``sigmoid(Linear(D, 1)(x)) * shared_expert(x)``). With ``expert_bias``
    they have biases too (an upcycled BERT FFN's shared part carries its biases)."""

    # The gate is a router's kind of weight: decayed, its logits would shrink once the task loss stops
    # pulling on them.
    no_weight_decay_params = ("gate.weight",)

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.ffn = FeedForward(cfg.hidden_size, cfg.num_shared_experts * cfg.shared_ffn_size, cfg.activation,
                               bias=cfg.expert_bias)
        self.gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y = self.ffn(x_TD)
        if self.gate is not None:
            y = torch.sigmoid(linear_as_input(x_TD, self.gate)) * y
        return y

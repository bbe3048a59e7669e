"""Expert parallelism: a :class:`PiMoELayer` whose experts are spread over the ranks of a process group.

Shape suffixes: T local tokens, D hidden, E experts (global), L = E/P local experts, P ranks,
K slots per token, S rows this rank sends (kept assignments, grouped by expert), R rows it
receives (grouped by source rank, then by local expert), N rows its experts compute (grouped by
local expert, then by source rank).

``ExpertParallelMoE.from_layer(layer, group)`` keeps the router and the shared experts replicated
(the very modules of ``layer``) and slices rank r's experts ``[r*L, (r+1)*L)`` out of the stacked
expert weights. A forward pass:

1. routes the local tokens with the layer's router and applies the layer's capacity rule to the
   local batch (capacity is per rank, as in GShard), exactly as ``PiMoELayer`` would on this
   rank's input;
2. sorts the kept assignments by expert (stable: token order inside an expert);
3. exchanges the per-expert counts first (one ``all_gather`` of a small vector that also carries
   the routing statistics; the split sizes are read on the host, the one sync of the pass);
4. all-to-alls the rows and, separately, their routing weights (a weight column would break the
   rows' 16-byte alignment that the grouped GEMMs need);
5. runs the local experts on the received rows with the same kernels as ``PiMoELayer``, the
   weight applied where :meth:`GroupedExperts.forward_grouped` applies it (the Triton experts read
   the rows through the regrouping permutation and write their outputs back in received order;
   the grouped-GEMM path gathers in and scatters out with ``index_copy``, so the backward has no
   accumulating scatter), then sends the results back with the inverse all-to-all;
6. sums each token's rows with fp32 accumulation, as ``PiMoELayer`` does.

With ``chunks=N`` the kept rows are ordered chunk by chunk of local tokens (by expert within a
chunk), step 3 exchanges the per-chunk counts (still one host sync), and steps 4-5 run per chunk,
pipelined: every chunk's all-to-alls are issued at once (``async_op``) and each chunk's experts run
as soon as its rows have arrived, so the exchanges overlap the expert GEMMs (the backward mirrors it).

The all-to-alls are autograd functions (the backward is the inverse all-to-all), so an expert
receives the gradients of its rows from every rank. Replicated parameters receive local gradients;
average them over the data-parallel group (:func:`fulu_nas.training.distributed.average_replicated_gradients`).
Every rank must call forward and backward the same number of times, in the same order.

Statistics: ``tokens_per_expert`` is the global load (summed over ranks), so ``load_balance``,
``max_vio``, ``cv``, ``utilisation`` and :meth:`update_expert_bias` see the whole batch and every
rank's aux-loss-free bias takes the same step. ``router_entropy`` and ``dropped_share`` are global
too. The differentiable losses stay local: ``aux_loss`` is ``E * sum_e f_e * P_e`` with the
*global* load share ``f_e`` and this rank's mean probabilities ``P_e``, and ``z_loss`` is the local
mean, so with equal per-rank batches the mean over ranks of either equals the single-process loss
on the concatenated batch.

:meth:`ExpertParallelMoE.gather_layer` all-gathers the experts into an ordinary single-device
``PiMoELayer``: checkpoints and exports are the same whatever the training layout.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import GroupedExperts, group_ends, inverse_permutation, sort_by_expert
from .layer import PiMoELayer
from .routing import Routing
from .stats import load_statistics


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 with uneven splits; the backward is the inverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_in = grad_out.new_empty((sum(ctx.in_splits), *grad_out.shape[1:]))
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> Tensor:
    """Send rows ``in_splits[s]`` of ``x`` to rank s, receive ``out_splits[s]`` rows from rank s
    (concatenated by source rank). Differentiable."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class _Exchange:
    """An all-to-all in flight (``async_op``): :func:`exchange_start` issues it and returns its output
    buffer, :func:`exchange_wait` makes the output's readers wait for it. The backward mirrors the
    pair: the wait's backward issues the inverse exchange of the gradient, the start's backward
    waits for it, so work between the two (another chunk's experts) overlaps the exchange in both
    directions."""

    def __init__(self, out_splits: list[int], in_splits: list[int], group):
        self.out_splits, self.in_splits, self.group = list(out_splits), list(in_splits), group
        self.work = self.grad_work = self.grad = None


class _ExchangeStart(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, exchange: _Exchange) -> Tensor:
        ctx.exchange = exchange
        out = x.new_empty((sum(exchange.out_splits), *x.shape[1:]))
        exchange.work = dist.all_to_all_single(out, x.contiguous(), exchange.out_splits, exchange.in_splits,
                                               group=exchange.group, async_op=True)
        return out

    @staticmethod
    def backward(ctx, _grad_token: Tensor):
        ctx.exchange.grad_work.wait()  # the inverse exchange issued by the wait's backward
        return ctx.exchange.grad, None


class _ExchangeWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, exchange: _Exchange) -> Tensor:
        ctx.exchange = exchange
        exchange.work.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        e = ctx.exchange
        e.grad = grad_out.new_empty((sum(e.in_splits), *grad_out.shape[1:]))
        e.grad_work = dist.all_to_all_single(e.grad, grad_out.contiguous(), e.in_splits, e.out_splits,
                                             group=e.group, async_op=True)
        return grad_out, None  # a token: the start's backward returns the exchanged gradient


def exchange_start(x: Tensor, out_splits: list[int], in_splits: list[int], group=None) -> tuple[Tensor, _Exchange]:
    """:func:`all_to_all` issued without waiting: the output may be read only after :func:`exchange_wait`."""
    exchange = _Exchange(out_splits, in_splits, group)
    return _ExchangeStart.apply(x, exchange), exchange


def exchange_wait(out: Tensor, exchange: _Exchange) -> Tensor:
    return _ExchangeWait.apply(out, exchange)


class _SumSlots(torch.autograd.Function):
    """``out[t] = sum_k y[row of slot t*K+k]`` (0 for a dropped slot) from the kept rows ``y_SD`` and
    their flat slots, accumulated in fp32. The backward is one gather: each row's gradient is its
    token's."""

    @staticmethod
    def forward(ctx, y_SD: Tensor, slot_S: Tensor, T: int, K: int) -> Tensor:
        ctx.save_for_backward(slot_S)
        ctx.K = K
        full = slot_S.shape[0] == T * K  # every slot kept: each is written, no zeros needed
        y_TKD = (y_SD.new_empty if full else y_SD.new_zeros)((T * K, y_SD.shape[1]))
        y_TKD.index_copy_(0, slot_S, y_SD)
        # torch's sum of a bf16/fp16 tensor accumulates in fp32 and rounds once, as PiMoELayer.
        # The width spelled out: a rank without tokens (T == 0) has no size to infer it from.
        return y_TKD.view(T, K, y_SD.shape[1]).sum(1)

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        (slot_S,) = ctx.saved_tensors
        return grad_TD[slot_S // ctx.K], None, None, None


def shard_experts(experts: GroupedExperts, start: int, stop: int) -> GroupedExperts:
    """A :class:`GroupedExperts` holding copies of experts ``[start, stop)`` of ``experts`` (every
    parameter is sliced along its leading expert dimension); it computes exactly what those
    experts compute in ``experts``."""
    shard = copy.copy(experts)  # the same kind of module, with the same settings (activation, ...)
    shard._parameters = OrderedDict()
    shard._buffers = OrderedDict(experts._buffers)
    shard._modules = OrderedDict(experts._modules)
    E = experts.num_experts
    for name, p in experts._parameters.items():
        if p is not None and p.shape[0] != E:
            raise ValueError(f"expert parameter {name} has no leading expert dimension: {tuple(p.shape)}")
        shard._parameters[name] = None if p is None else nn.Parameter(
            p.detach()[start:stop].clone(), requires_grad=p.requires_grad)
    return shard


class ExpertParallelMoE(PiMoELayer):
    """A :class:`PiMoELayer` whose experts are split over the ranks of ``group`` (module doc).

    Same ``forward(x, token_ids=None, impl=None, with_stats=True) -> (out, stats)`` contract as
    ``PiMoELayer``: each rank passes its own tokens and gets its own tokens' outputs. It is a
    ``PiMoELayer`` subclass so models that look for their MoE layers by type keep working after
    :func:`fulu_nas.training.distributed.expert_parallel` swaps it in; :meth:`parameter_counts` counts all
    experts, :meth:`remap_experts` is not supported (gather first).

    ``impl``: the local experts run as one grouped GEMM (``torch._grouped_mm``) for ``grouped``,
    ``grouped_mm`` and ``triton``, and as one matmul pair per expert for ``sorted`` and ``loop``.
    Unlike ``PiMoELayer`` the pass reads the split sizes on the host, so it is not for
    ``torch.compile(fullgraph=True)``, CUDA graphs or ``torch.export`` (gather the layer first).
    """

    def __init__(self, layer: PiMoELayer, group: dist.ProcessGroup | None = None, chunks: int = 1):
        nn.Module.__init__(self)
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(f"chunks must be a positive integer, got {chunks!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed process group")
        if isinstance(layer, ExpertParallelMoE):
            raise ValueError("the layer is already expert-parallel")
        P, rank = dist.get_world_size(group), dist.get_rank(group)
        E = layer.cfg.num_experts
        if E % P:
            raise ValueError(f"expert parallelism over {P} ranks needs num_experts divisible by {P}, "
                             f"got num_experts={E}")
        L = E // P
        self.cfg = layer.cfg
        self.group = group
        self.rank, self.world_size, self.local_experts = rank, P, L
        self.chunks = chunks
        self.router = layer.router
        self.experts = shard_experts(layer.experts, rank * L, (rank + 1) * L)
        self.shared = layer.shared
        self.train(layer.training)

    @classmethod
    def from_layer(cls, layer: PiMoELayer, group: dist.ProcessGroup | None = None,
                   chunks: int = 1) -> ExpertParallelMoE:
        """The expert-parallel form of ``layer`` on this rank of ``group`` (default: the world).
        Shares ``layer``'s router and shared experts; copies this rank's slice of its experts.
        ``layer`` must be identical on every rank (same seed, or broadcast it first).

        ``chunks``: the local tokens are exchanged in that many chunks, each chunk's all-to-alls in
        flight while another chunk's rows are in the experts (:meth:`_exchange_chunks`); the result
        is the same as one exchange's up to floating-point rounding."""
        return cls(layer, group, chunks)

    @property
    def expert_range(self) -> tuple[int, int]:
        """The global indices ``[start, stop)`` of the experts held by this rank."""
        return self.rank * self.local_experts, (self.rank + 1) * self.local_experts

    def extra_repr(self) -> str:
        start, stop = self.expert_range
        chunks = f", chunks={self.chunks}" if self.chunks > 1 else ""
        return f"rank={self.rank}/{self.world_size}, experts=[{start}, {stop}) of {self.cfg.num_experts}{chunks}"

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, x: Tensor, token_ids: Tensor | None = None, impl: str | None = None,
                with_stats: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.cfg
        # As PiMoELayer.forward (under autocast the exchanged rows are in its dtype; a bad impl is refused
        # on every rank before the first collective).
        x_TD, routing, impl = self._routed_input(x, token_ids, impl)
        slot_S = None
        if cfg.token_choice:
            token_S, weight_S, counts_E, slot_S, dropped, active = self._dispatch_token_choice(routing)
        else:
            token_S, weight_S, counts_E, dropped, active = self._dispatch_expert_choice(x_TD, routing)
        entropy = _entropy_sum(routing.probs_TE, x_TD) if with_stats else x_TD.new_zeros((), dtype=torch.float32)
        E, C = cfg.num_experts, self.chunks
        if C > 1:  # the rows in chunks of tokens (chunk-major, by expert within a chunk): counts per chunk
            token_S, weight_S, slot_S, counts_E = self._rows_by_chunk(x_TD.shape[0], token_S, weight_S,
                                                                      slot_S if cfg.token_choice else None, counts_E)
        # Counts first: every rank learns every rank's per-chunk, per-expert counts (split sizes and
        # global load).
        local_E4 = torch.cat([counts_E.reshape(-1).double(),
                              torch.stack([entropy.double(), entropy.new_tensor(float(x_TD.shape[0])).double(),
                                           dropped.double(), active.double()])])
        gathered = torch.stack(self._all_gather(local_E4))
        counts_PCE = gathered[:, :C * E].long().view(-1, C, E).tolist()  # the one host sync
        gathered_PE4 = torch.cat([gathered[:, :C * E].view(-1, C, E).sum(1), gathered[:, C * E:]], 1)

        if C > 1:
            y_SD = self._exchange_chunks(x_TD, token_S, weight_S, counts_PCE, impl)
        else:
            y_SD = self._exchange_and_compute(x_TD, token_S, weight_S, [c[0] for c in counts_PCE], impl)
        if cfg.token_choice:  # each token's K slots (dropped ones 0), summed with fp32 accumulation
            T, K = routing.expert_TK.shape
            out_TD = _SumSlots.apply(y_SD, slot_S, T, K)
        else:  # a token may be taken by several experts: accumulate in fp32
            out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device).index_add_(
                0, token_S, y_SD.float()).to(x_TD.dtype)
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        if not with_stats:
            return out_TD.view(x.shape), {}
        return out_TD.view(x.shape), self._global_stats(routing, gathered_PE4)

    def _dispatch_token_choice(self, r: Routing):
        """Kept assignments sorted by expert: token, weight, per-expert counts, flat slot."""
        E = self.cfg.num_experts
        T, K = r.expert_TK.shape
        expert_N = r.expert_TK.reshape(-1)
        active_N = r.active_TK.reshape(-1)
        order_N = sort_by_expert(expert_N, E)
        expert_sorted_N = expert_N[order_N]
        active_sorted_N = active_N[order_N]
        keep_sorted_N = active_sorted_N
        if self.cfg.capacity_factor is not None:  # PiMoELayer's rule, on this rank's T tokens
            ends_E = group_ends(expert_sorted_N, E)
            starts_E = torch.nn.functional.pad(ends_E[:-1], (1, 0))
            keep_sorted_N = self._capacity_keep_sorted(active_sorted_N, expert_sorted_N, starts_E, T)
        slot_S = order_N[keep_sorted_N]  # inactive (top-p) and dropped slots are not sent
        kept_E = torch.searchsorted(expert_N[slot_S], torch.arange(E + 1, device=expert_N.device))
        counts_E = kept_E[1:] - kept_E[:-1]  # the kept rows are sorted by expert
        weight_S = r.weight_TK.reshape(-1)[slot_S]
        dropped = (active_sorted_N & ~keep_sorted_N).float().sum()
        return slot_S // K, weight_S, counts_E, slot_S, dropped, active_N.float().sum()

    def _dispatch_expert_choice(self, x_TD: Tensor, r: Routing):
        """Expert choice is grouped by expert already: every expert takes C rows."""
        E, C, token_S = self.cfg.num_experts, r.capacity, r.token_N
        taken_T = torch.zeros(x_TD.shape[0], device=x_TD.device).index_add_(
            0, token_S, torch.ones(token_S.shape, device=x_TD.device))
        counts_E = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
        untaken = (taken_T == 0).float().sum()
        return token_S, r.weight_N, counts_E, untaken, taken_T.new_tensor(float(x_TD.shape[0]))

    def _rows_by_chunk(self, T: int, token_S: Tensor, weight_S: Tensor, slot_S: Tensor | None, counts_E: Tensor):
        """The kept rows (sorted by expert) reordered chunk by chunk (chunk c: tokens ``[c*T/C, (c+1)*T/C)``),
        still by expert within a chunk; and the (C, E) counts."""
        C, E = self.chunks, self.cfg.num_experts
        expert_S = torch.repeat_interleave(torch.arange(E, device=token_S.device), counts_E)
        chunk_S = token_S * C // max(T, 1)
        order_S = torch.sort(chunk_S, stable=True).indices
        counts_CE = torch.bincount(chunk_S * E + expert_S, minlength=C * E).view(C, E)
        return (token_S[order_S], weight_S[order_S], None if slot_S is None else slot_S[order_S], counts_CE)

    def _plan(self, counts_PE: list[list[int]]) -> tuple[list[int], list[list[int]], list[int]]:
        """From every rank's per-expert counts: the rows this rank sends to each rank, the rows it
        receives from each rank per local expert, and their sums."""
        P, L, rank = self.world_size, self.local_experts, self.rank
        send_splits = [sum(counts_PE[rank][s * L:(s + 1) * L]) for s in range(P)]
        recv_PL = [counts_PE[s][rank * L:(rank + 1) * L] for s in range(P)]
        return send_splits, recv_PL, [sum(c) for c in recv_PL]

    def _exchange_and_compute(self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_PE: list[list[int]],
                              impl: str) -> Tensor:
        """Send each row and its routing weight to its expert's rank, compute it there, send the
        weighted results back: returns the S rows' outputs in ``token_S`` order."""
        send_splits, recv_PL, recv_splits = self._plan(counts_PE)
        # Rows and weights travel separately: a weight column would break the rows' 16-byte alignment.
        recv_RD = all_to_all(x_TD[token_S], recv_splits, send_splits, self.group)
        weight_R = all_to_all(weight_S.float(), recv_splits, send_splits, self.group)
        y_RD = self._compute_received(recv_RD, weight_R, recv_PL, impl)
        return all_to_all(y_RD, send_splits, recv_splits, self.group)

    def _exchange_chunks(self, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, counts_PCE: list[list[list[int]]],
                         impl: str) -> Tensor:
        """:meth:`_exchange_and_compute` chunk by chunk, pipelined: every chunk's rows are sent at once;
        chunk c's experts run as soon as its rows have arrived, while the later chunks' rows travel
        and the earlier chunks' results travel back. Returns the rows' outputs in ``token_S`` order."""
        P, C = self.world_size, self.chunks
        plans = [self._plan([counts_PCE[s][c] for s in range(P)]) for c in range(C)]
        rows_C = [sum(counts_PCE[self.rank][c]) for c in range(C)]
        sent = []
        for (send_splits, _, recv_splits), token_s, weight_s in zip(plans, token_S.split(rows_C),
                                                                    weight_S.split(rows_C), strict=True):
            sent.append((exchange_start(x_TD[token_s], recv_splits, send_splits, self.group),
                         exchange_start(weight_s.float(), recv_splits, send_splits, self.group)))
        back = []
        for (send_splits, recv_PL, recv_splits), (rows, weights) in zip(plans, sent, strict=True):
            y_RD = self._compute_received(exchange_wait(*rows), exchange_wait(*weights), recv_PL, impl)
            back.append(exchange_start(y_RD, send_splits, recv_splits, self.group))
        return torch.cat([exchange_wait(*returned) for returned in back])

    def _compute_received(self, recv_RD: Tensor, weight_R: Tensor, recv_PL: list[list[int]], impl: str) -> Tensor:
        """This rank's experts on the rows it received (grouped by source rank, then local expert),
        weighted: their outputs in received order."""
        P, L, D = self.world_size, self.local_experts, self.cfg.hidden_size
        # Received rows come grouped by source rank, then local expert; the experts want them
        # grouped by local expert: order_R[n] is the received row that is expert row n.
        device = recv_RD.device
        counts_L = [sum(recv_PL[s][e] for s in range(P)) for e in range(L)]
        local_R = torch.repeat_interleave(torch.arange(L, device=device).repeat(P),
                                          torch.tensor([c for row in recv_PL for c in row], device=device))
        order_R = sort_by_expert(local_R, L)
        R = recv_RD.shape[0]
        if R == 0:
            # No rows for this rank's experts: compute one zero-weight zero row (grouped GEMMs of
            # no rows are not supported everywhere); it keeps the backward exchange in the graph
            # and gives the idle experts exact zero gradients, as PiMoELayer does.
            recv_RD = torch.cat([recv_RD, recv_RD.new_zeros((1, D))])
            weight_R = torch.cat([weight_R, weight_R.new_zeros(1)])
            order_R = torch.zeros(1, dtype=order_R.dtype, device=device)
            local_R = torch.full((1,), L - 1, dtype=local_R.dtype, device=device)
            counts_L[-1] += 1
        return self._local_experts(recv_RD, weight_R, order_R, local_R, counts_L, impl)[:R]

    def _local_experts(self, recv_RD: Tensor, weight_R: Tensor, order_R: Tensor, local_R: Tensor,
                       counts_L: list[int], impl: str) -> Tensor:
        """This rank's experts on the received rows (expert row n is received row ``order_R[n]``),
        weighted; returns the outputs in received order."""
        ends_L = torch.tensor(counts_L, device=recv_RD.device).cumsum(0).to(torch.int32)
        if self._triton_applies(recv_RD, impl):
            # The Triton experts read row order_R[n] and write its output back to row order_R[n].
            return self._triton_experts(recv_RD, order_R, weight_R, ends_L, 1, False, True)
        # Both regroupings are permutations written with index_copy, whose backward is a gather
        # (indexing with order_R would have an accumulating scatter as its backward).
        inverse_R = inverse_permutation(order_R)
        x_ND = torch.empty_like(recv_RD).index_copy_(0, inverse_R, recv_RD)
        w_N = torch.empty_like(weight_R).index_copy_(0, inverse_R, weight_R)
        if impl in ("sorted", "loop"):
            y_ND = self.experts.forward_sorted(x_ND, torch.tensor(counts_L)) * w_N[:, None].to(x_ND.dtype)
        else:
            y_ND = self.experts.forward_grouped(x_ND, ends_L, local_R[order_R], w_N)
        return torch.empty_like(y_ND).index_copy_(0, order_R, y_ND)

    def _all_gather(self, t: Tensor) -> list[Tensor]:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return parts

    def _global_stats(self, r: Routing, gathered_PE4: Tensor) -> dict[str, Tensor]:
        E = self.cfg.num_experts
        total = gathered_PE4.sum(0)
        counts_E = total[:E].float()
        entropy_sum, tokens, dropped, active = total[E:].unbind()
        stats = load_statistics(counts_E)
        stats["router_entropy"] = (entropy_sum / tokens.clamp_min(1)).float()
        if self.cfg.token_choice:
            stats["dropped_share"] = (dropped / active.clamp_min(1)).float()
        else:
            stats["dropped_share"] = (dropped / tokens.clamp_min(1)).float()
        return self._add_balance_losses(stats, r, counts_E)

    # -- layout -----------------------------------------------------------------------------------

    @torch.no_grad()
    def gather_layer(self) -> PiMoELayer:
        """An ordinary single-device :class:`PiMoELayer` with every expert (a collective: call it
        on every rank). Its ``state_dict`` is what the single-device layer would have: tensors on
        this rank's device and in the EP module's dtypes; router, shared experts and buffers are
        copies of this rank's replicas."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if not k.startswith("experts.")}
        for name, p in self.experts.named_parameters():
            state[f"experts.{name}"] = torch.cat(self._all_gather(p.detach()))
        with torch.random.fork_rng(devices=[]):  # building the layer must not move the caller's RNG
            layer = PiMoELayer(self.cfg)
        layer.load_state_dict(state, assign=True)
        mine = dict(self.named_parameters())
        for name, p in layer.named_parameters():
            p.requires_grad_(mine[name].requires_grad)
        return layer.to(self.experts.w13_EDF2.device).train(self.training)

    def parameter_counts(self) -> dict[str, int]:
        """As for the whole layer (all experts on every rank), not for this rank's shard."""
        per_expert = sum(p[0].numel() for p in self.experts.parameters())
        E = self.cfg.num_experts
        total = sum(p.numel() for p in self.parameters()) + per_expert * (E - self.local_experts)
        active = total - round(per_expert * (E - self.cfg.experts_per_token()))
        return {"total": total, "active": active}

    def remap_experts(self, source: list[int], noise: float = 0.0):
        raise NotImplementedError("remap_experts on an expert-parallel layer: gather_layer() first, "
                                  "remap, then from_layer() again")


def _entropy_sum(probs_TE: Tensor | None, x_TD: Tensor) -> Tensor:
    """Sum over local tokens of the router distribution's entropy (0 for a fixed assignment)."""
    if probs_TE is None:
        return torch.zeros((), device=x_TD.device)
    return (-(probs_TE * torch.log(probs_TE.clamp_min(1e-30))).sum(-1)).sum().detach()

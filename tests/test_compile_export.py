"""No host syncs or data-dependent shapes in forward: torch.compile(fullgraph=True) and
torch.export succeed for every router, with dynamic batch and sequence dimensions."""

from __future__ import annotations

import pytest
import torch

from fulu_nas.moe import MoEConfig, PiMoELayer

from .helpers import assert_compiled_trains_as_eager, make_layer


def routed_layer(router):
    # capacity and top-p exercise the extra index arithmetic on the static-shape path
    extra = {"capacity_factor": 1.25} if router in ("topk", "hash") else {}
    if router == "hierarchical":
        extra["top_p"] = 0.7
    return make_layer(router, num_shared_experts=1, shared_expert_gate=True, **extra)


def test_compile_fullgraph_forward_and_backward(router):
    torch._dynamo.reset()
    layer = routed_layer(router)
    x = torch.randn(2, 9, 32, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, stats = compiled(x)
    ref, ref_stats = layer(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, g)
    (ref_gx,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(gx, ref_gx)


# The upcycled-BERT layer (GELU, expert biases) with a z-loss: Inductor's CPU code for autograd's
# scatter-add backward of the slot sum ran after the kernel that read its result, so every gradient
# through the experts was zero while the output matched; with or without the statistics read.
@pytest.mark.parametrize("overrides,read_stats", [
    ({"activation": "gelu", "expert_bias": True, "z_loss_coef": 0.01}, True),
    ({"activation": "gelu", "expert_bias": True, "z_loss_coef": 0.01}, False),
    ({"z_loss_coef": 0.01, "aux_loss_coef": 0.02}, True),
    ({"top_k": 3, "activation": "gelu"}, True),
])
def test_inductor_trains_as_the_eager_layer(overrides, read_stats):
    """Inductor's own code (not aot_eager's): the compiled layer's gradients equal the eager layer's."""
    torch._dynamo.reset()
    layer = PiMoELayer(MoEConfig(**{"hidden_size": 16, "num_experts": 4, "expert_ffn_size": 16, "top_k": 2,
                                    **overrides}))
    assert_compiled_trains_as_eager(layer, torch.randn(2, 7, 16), read_stats)


def test_export_with_dynamic_batch_and_sequence(router):
    layer = routed_layer(router).eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.export.export(layer, (torch.randn(2, 8, 32),), dynamic_shapes=({0: batch, 1: seq},))
    exported = program.module()
    # (1, 1) and (1, 3): expert choice's capacity is 1 there (8 experts, cf 2), which the program
    # used to refuse ("Guard failed") after tracing at a capacity of 4
    for shape in [(3, 5, 32), (1, 17, 32), (1, 1, 32), (1, 3, 32)]:
        x = torch.randn(shape)
        out, stats = exported(x)
        ref, ref_stats = layer(x)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(stats["load_balance"], ref_stats["load_balance"])


def test_inductor_compiles_the_grouped_path():
    torch._dynamo.reset()
    layer = PiMoELayer(MoEConfig(hidden_size=32, num_experts=4, expert_ffn_size=32, top_k=2))
    x = torch.randn(16, 32)
    out, _ = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(out, layer(x)[0], rtol=1e-5, atol=1e-5)


class WithImpl(torch.nn.Module):
    def __init__(self, layer, impl):
        super().__init__()
        self.layer, self.impl = layer, impl

    def forward(self, x):
        return self.layer(x, impl=self.impl)


SYNC_OPS = ("aten.item", "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select")


def data_dependent_parts(program) -> list[str]:
    """Unbacked symbols (sizes known only at run time, i.e. a host sync) and ops that read
    device values on the host."""
    unbacked = [str(s) for s in program.range_constraints if str(s).startswith("u")]
    ops = [str(n.target) for n in program.graph.nodes
           if n.op == "call_function" and str(n.target).startswith(SYNC_OPS)]
    return unbacked + ops


def test_fast_path_graph_has_no_data_dependent_shapes(router):
    program = torch.export.export(WithImpl(routed_layer(router), "grouped"), (torch.randn(24, 32),))
    assert data_dependent_parts(program) == []


@pytest.mark.parametrize("impl", ["sorted", "loop"])
def test_reference_paths_show_their_syncs(impl):
    # Positive control: the baselines read counts / masks on the host, and the check sees it.
    program = torch.export.export(WithImpl(make_layer("topk"), impl), (torch.randn(24, 32),))
    assert data_dependent_parts(program)


def test_split_bf16_weight_survives_inductor():
    """The router weight's bf16 high/low split (CUDA bf16 inference) must not be folded away by the
    compiler: ``w.to(bf16).float()`` is an identity to Inductor, which made the low part zero."""
    from fulu_nas.moe.routing import split_bf16

    torch._dynamo.reset()
    w = torch.randn(64, 128)
    hi, lo = split_bf16(w)
    chi, clo = torch.compile(split_bf16, fullgraph=True)(w)
    assert torch.equal(hi, chi) and torch.equal(lo, clo)
    assert lo.abs().max() > 0
    # hi + lo carries about 16 significant bits: far closer to w than bf16 alone
    err = (hi.float() + lo.float() - w).abs() / w.abs()
    assert err.max() < 2**-15
    assert (hi.float() + lo.float() - w).abs().max() < 0.01 * (w.to(torch.bfloat16).float() - w).abs().max()


def test_compiled_inference_routes_like_eager(router):
    """Inductor-compiled inference chooses the same experts as eager for every router."""
    torch._dynamo.reset()
    layer = make_layer(router, num_experts=16, top_k=2).eval()
    x = torch.randn(4, 64, 32)
    token_ids = torch.randint(0, 1000, (4, 64)) if router == "hash" else None
    with torch.inference_mode():
        expected = layer.router(x.reshape(-1, 32), token_ids=token_ids, batch_shape=(4, 64))
        routing = torch.compile(layer.router, fullgraph=True)(x.reshape(-1, 32), token_ids=token_ids,
                                                              batch_shape=(4, 64))
        out, stats = torch.compile(layer, fullgraph=True)(x, token_ids)
        ref, ref_stats = layer(x, token_ids)
    chosen, ref_chosen = ((r.expert_TK, r.token_EC) for r in (routing, expected))
    for got, want in zip(chosen, ref_chosen, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert torch.equal(stats["tokens_per_expert"], ref_stats["tokens_per_expert"])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2])
def test_inductor_compiles_a_call_of_one_or_two_tokens(router, tokens):
    """A one-token expert-choice call crashed inductor's CPU code generation (the statistics'
    count of taken tokens, an index_add_ into a one-element buffer)."""
    torch._dynamo.reset()
    layer = make_layer(router).eval()
    x = torch.randn(tokens, 32)
    token_ids = torch.randint(0, 1000, (tokens,)) if router == "hash" else None
    with torch.no_grad():
        out, stats = torch.compile(layer, fullgraph=True)(x, token_ids)
        ref, ref_stats = layer(x, token_ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for key in ("tokens_per_expert", "dropped_share", "load_balance"):
        torch.testing.assert_close(stats[key], ref_stats[key])

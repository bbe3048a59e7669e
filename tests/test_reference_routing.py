"""Routing math against independent references written here: Mixtral's sparse MoE block,
DeepSeek-V3's group-limited routing, Switch's capacity rule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .helpers import make_layer


class MixtralStyleBlock(nn.Module):
    """A transcription of Hugging Face's MixtralSparseMoeBlock (eval mode): softmax over all
    experts in fp32, top-k, renormalise, SwiGLU experts w2(silu(w1 x) * w3 x)."""

    def __init__(self, hidden, ffn, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(hidden, ffn, bias=False) for _ in range(experts))
        self.w3 = nn.ModuleList(nn.Linear(hidden, ffn, bias=False) for _ in range(experts))
        self.w2 = nn.ModuleList(nn.Linear(ffn, hidden, bias=False) for _ in range(experts))

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        hidden_states = hidden_states.view(-1, d)
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros((b * s, d), dtype=hidden_states.dtype)
        expert_mask = F.one_hot(selected_experts, num_classes=len(self.w1)).permute(2, 1, 0)
        for e in range(len(self.w1)):
            idx, top_x = torch.where(expert_mask[e])
            current = hidden_states[None, top_x].reshape(-1, d)
            y = self.w2[e](F.silu(self.w1[e](current)) * self.w3[e](current)) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, y.to(hidden_states.dtype))
        return final.reshape(b, s, d)


def load_mixtral_weights(layer, block):
    with torch.no_grad():
        layer.router.gate.weight.copy_(block.gate.weight)
        for e in range(len(block.w1)):
            layer.experts.w13_EDF2[e].copy_(torch.cat([block.w1[e].weight.t(), block.w3[e].weight.t()], dim=1))
            layer.experts.w2_EFD[e].copy_(block.w2[e].weight.t())


def test_topk_softmax_renorm_is_mixtral():
    block = MixtralStyleBlock(32, 48, 8, 2).eval()
    layer = make_layer("topk", hidden_size=32, expert_ffn_size=48, num_experts=8, top_k=2).eval()
    load_mixtral_weights(layer, block)
    x = torch.randn(4, 9, 32)
    out, _ = layer(x)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)


def deepseek_v3_routing(scores, bias, n_group, topk_group, top_k, scaling):
    """DeepSeek-V3's reference gate (inference code): group score = sum of the top-2 biased
    scores, keep topk_group groups (others -inf), top-k inside, weights from unbiased scores."""
    t, e = scores.shape
    biased = scores + bias
    group_scores = biased.view(t, n_group, -1).topk(2, dim=-1)[0].sum(-1)
    groups = group_scores.topk(topk_group, dim=-1)[1]
    mask = torch.ones(t, n_group, dtype=torch.bool).scatter_(1, groups, False)
    biased = biased.view(t, n_group, -1).masked_fill(mask[..., None], float("-inf")).flatten(1)
    idx = biased.topk(top_k, dim=-1)[1]
    w = scores.gather(1, idx)
    w = w / w.sum(-1, keepdim=True)
    return idx, w * scaling


def test_hierarchical_depth2_is_deepseek_v3_group_limited_routing():
    layer = make_layer("hierarchical", num_experts=16, top_k=4, score_func="sigmoid",
                       hierarchy_depth=2, hierarchy_groups=(4,), hierarchy_topk_groups=(2,),
                       routed_scaling_factor=2.5).eval()
    # A bias that pushes some biased scores negative: the -inf masking then matters.
    layer.router.expert_bias.copy_(torch.linspace(-1.5, 0.5, 16))
    x = torch.randn(40, 32)
    r = layer.router(x)
    scores = torch.sigmoid(F.linear(x, layer.router.gate.weight))
    idx, w = deepseek_v3_routing(scores, layer.router.expert_bias, 4, 2, 4, 2.5)
    assert torch.equal(r.expert_TK.sort(-1).values, idx.sort(-1).values)
    torch.testing.assert_close(r.weight_TK.gather(1, r.expert_TK.argsort(-1)), w.gather(1, idx.argsort(-1)))


def test_hierarchical_depth1_equals_topk():
    x = torch.randn(2, 13, 32)
    topk = make_layer("topk", seed=3)
    hier = make_layer("hierarchical", seed=3, hierarchy_depth=1)
    hier.load_state_dict(topk.state_dict())
    torch.testing.assert_close(hier(x)[0], topk(x)[0], rtol=0, atol=0)


def test_switch_capacity_keeps_earliest_tokens():
    # top-1, capacity factor 1, 12 tokens on 4 experts: capacity 3 per expert; the gate sends
    # most tokens to expert 0, so it overflows.
    layer = make_layer("topk", num_experts=4, top_k=1, capacity_factor=1.0)
    with torch.no_grad():
        layer.router.gate.weight[0, 0] = 10.0
    x = torch.randn(12, 32)
    x[:, 0] = torch.linspace(-0.5, 3, 12)
    r = layer.router(x)
    out, stats = layer(x)
    chosen = r.expert_TK[:, 0].tolist()
    assert chosen.count(0) > 3
    seen = {e: 0 for e in range(4)}
    for t, e in enumerate(chosen):  # Switch's rule: places go in token order
        seen[e] += 1
        if seen[e] <= 3:
            torch.testing.assert_close(out[t], layer.experts.expert(e, x[t:t + 1])[0] * r.weight_TK[t, 0])
        else:
            assert torch.all(out[t] == 0), f"token {t} should have been dropped"
    dropped = sum(max(0, n - 3) for n in seen.values())
    assert stats["tokens_per_expert"].tolist() == [min(3, n) for n in seen.values()]
    torch.testing.assert_close(stats["dropped_share"], torch.tensor(dropped / 12))

"""Single-GPU baseline of the expert-parallel benchmark (BENCHMARKS.md, issue 8): the same per-rank
work without communication, i.e. a layer of E/P experts on the tokens of one rank.

    python3 benchmarks/ep_baseline.py HIDDEN EXPERTS FFN TOP_K TOKENS STEPS
"""

import sys
import time

import torch

from fulu_nas.moe import MoEConfig, PiMoELayer

D, E, F, K, T, steps = (int(a) for a in sys.argv[1:7])
torch.manual_seed(0)
layer = PiMoELayer(MoEConfig(hidden_size=D, num_experts=E, expert_ffn_size=F, top_k=K)).cuda().to(torch.bfloat16)
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def step() -> None:
    out, stats = layer(x)
    (out.float().square().mean() + stats["balance_loss"]).backward()
    layer.zero_grad(set_to_none=True)
    x.grad = None


for _ in range(2):
    step()
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(steps):
    step()
torch.cuda.synchronize()
seconds = (time.perf_counter() - start) / steps
print(f"single GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}: "
      f"{T} tokens, E={E}, D={D}, F={F}, top-{K}, bf16: {seconds * 1e3:.2f} ms per forward+backward, "
      f"{T / seconds:,.0f} tokens/s")

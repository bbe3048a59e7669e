"""Single-GPU baseline of the expert-parallel benchmark (BENCHMARKS.md, expert parallelism): the same per-rank
work without communication, i.e. a layer of E/P experts on the tokens of one rank.

    python3 benchmarks/ep_baseline.py HIDDEN EXPERTS FFN TOP_K TOKENS STEPS [IMPL [PROFILE_FILE]]

IMPL: the experts' kernels (default: the layer's, grouped); PROFILE_FILE: also write a
torch.profiler table of 3 steps there.
"""

import argparse
import sys
import time

import torch

parser = argparse.ArgumentParser(description="The single-GPU baseline of the expert-parallel benchmark.")
for name in ("hidden", "experts", "ffn", "top_k", "tokens", "steps"):
    parser.add_argument(name, type=int)
parser.add_argument("impl", nargs="?", default=None, help="the experts' kernels (default: the layer's)")
parser.add_argument("profile_file", nargs="?", default=None, help="also write a torch.profiler table of 3 steps")
args = parser.parse_args()
if not torch.cuda.is_available():
    print("ep_baseline: needs CUDA (it times one GPU's share of the expert-parallel step)", file=sys.stderr)
    sys.exit(2)
from fulu_nas.moe import MoEConfig, PiMoELayer  # noqa: E402 - after the arguments: --help needs no fulu_nas

D, E, F, K, T, steps = args.hidden, args.experts, args.ffn, args.top_k, args.tokens, args.steps
impl, profile_file = args.impl, args.profile_file
torch.manual_seed(0)
layer = PiMoELayer(MoEConfig(hidden_size=D, num_experts=E, expert_ffn_size=F, top_k=K)).cuda().to(torch.bfloat16)
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)

def step() -> None:
    out, stats = layer(x, impl=impl)
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
if profile_file:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    with open(profile_file, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
print(f"single GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, NCCL {torch.cuda.nccl.version()}: "
      f"{T} tokens, E={E}, D={D}, F={F}, top-{K}, bf16, impl {impl or layer.cfg.impl}: "
      f"{seconds * 1e3:.2f} ms per forward+backward, "
      f"{T / seconds:,.0f} tokens/s")

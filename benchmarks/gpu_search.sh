#!/usr/bin/env bash
# The GPU search's figures (BENCHMARKS.md, "The search on a GPU"), on a machine with one GPU:
#   bash benchmarks/gpu_search.sh OUT_DIR [n_trials] [worker counts...]
# nvidia-smi samples the GPU's utilisation every 0.5 s throughout; each search's row (searches.jsonl)
# has the median and mean of the samples taken while it ran.
# 1. `fulu-nas search +experiment=gpu` (n_trials, default 12), then the export of its winner and a
#    torch-only load on the GPU;
# 2. with CONFIRM set (e.g. CONFIRM="top_k=3 budget_factor=2 n_workers=3"), `fulu-nas confirm` of that
#    search with those options (3 seeds);
# 3. the same search with each worker count (default: 2 4) sharing the GPU, each its own study, for
#    trials per hour (a count of 1 adds none: step 1 is one worker's). Every search's summary, study and
#    MLflow database land in OUT_DIR. OVERRIDES adds Hydra overrides to every search (e.g. trainer.steps=400).
# fulu-nas must be importable (installed, or the checkout on PYTHONPATH: `python3 -m fulu_nas`).
set -euo pipefail
out=$(realpath -m "$1"); n_trials=${2:-12}; shift $(( $# >= 2 ? 2 : $# ))
workers=("$@"); [ ${#workers[@]} -gt 0 ] || workers=(2 4)
mkdir -p "$out"
work=$(mktemp -d)
cd "$work"
fulu() { python3 -m fulu_nas "$@"; }

search() {  # name n_workers
  local start end
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # OVERRIDES holds several key=value overrides
  fulu search +experiment=gpu study.name="$1" study.n_workers="$2" study.n_trials="$n_trials" hydra.run.dir="outputs/$1" \
    ${OVERRIDES:-}
  end=$(date +%s.%N)
  python3 - "$1" "$2" "$start" "$end" "$out" <<'PY'
import json, statistics, sys
from datetime import datetime
name, workers, start, end, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
summary = json.load(open(f"outputs/{name}/summary.json"))
hours = (end - start) / 3600
busy = []  # nvidia-smi's utilisation samples (local time stamps) while this search ran
for line in open(f"{out}/nvidia-smi.csv"):
    stamp, util, _ = (x.strip() for x in line.split(","))
    if start <= datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp() <= end:
        busy.append(float(util.split()[0]))
row = {"study": name, "workers": workers, "seconds": end - start, "finished": summary["n_finished"],
       "trials_per_hour": summary["n_finished"] / hours,
       "gpu_utilisation_median": statistics.median(busy) if busy else None,
       "gpu_utilisation_mean": statistics.mean(busy) if busy else None, "samples": len(busy)}
print(json.dumps(row))
with open(f"{out}/searches.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
PY
  cp "outputs/$1/summary.json" "$out/$1-summary.json"
  cp "outputs/$1/optuna.db" "$out/$1-optuna.db"
  cp "outputs/$1/mlflow.db" "$out/$1-mlflow.db"
}

nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 >"$out/nvidia-smi.csv" &
smi=$!
trap 'kill "$smi"' EXIT
search gpu-w1 1
fulu export study.name=gpu-w1 hydra.run.dir=outputs/gpu-w1 out="$work/model"
python3 - "$work/model" <<'PY' | tee "$out/export-check.txt"
# The exported program with torch alone on the GPU, against the fulu_nas module on the GPU.
import hashlib, io, json, sys
import torch
from torch.export.passes import move_to_device_pass
import fulu_nas

folder = sys.argv[1]
data = open(f"{folder}/model.pt2", "rb").read()
assert hashlib.sha256(data).hexdigest() == json.load(open(f"{folder}/checksums.json"))["model.pt2"]
program = move_to_device_pass(torch.export.load(io.BytesIO(data)), "cuda").module()
model = fulu_nas.load(folder, map_location="cuda")
tokens = torch.randint(0, model.embed.num_embeddings, (4, model.pos.num_embeddings), device="cuda")  # the task's
with torch.no_grad():
    want, got = model(tokens).logits, program(tokens)
    bf16 = model.to(torch.bfloat16)(tokens).logits.float()
err = ((got - want).norm() / want.norm()).item()
print(f"torch-only program on {torch.cuda.get_device_name()}: relative error {err:.2e} vs the module (fp32); "
      f"bf16 module vs fp32: {((bf16 - want).norm() / want.norm()).item():.2e}")
assert err < 1e-2
PY
if [ -n "${CONFIRM:-}" ]; then
  # shellcheck disable=SC2086  # CONFIRM holds several key=value options
  fulu confirm study.name=gpu-w1 hydra.run.dir=outputs/gpu-w1 $CONFIRM
  cp outputs/gpu-w1/confirmation.json "$out/gpu-w1-confirmation.json"
  cp outputs/gpu-w1/optuna.db "$out/gpu-w1-optuna.db"
fi
for n in "${workers[@]}"; do [ "$n" = 1 ] || search "gpu-w$n" "$n"; done

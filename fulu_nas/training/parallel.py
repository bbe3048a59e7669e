"""Training over P devices with expert parallelism (a search trial's ``trainer.expert_parallel=P``):
the parent side launches it, the rank side trains it. Needs torch and safetensors only (no search
dependencies), so it runs wherever the model trains.

The search objective calls :func:`train_expert_parallel`, which writes a spec (architecture, task,
training budget) to a scratch folder and runs::

    python -m torch.distributed.run --standalone --nproc-per-node=P -m fulu_nas.training.parallel spec.json

(torchrun: a free rendezvous port, and every rank is torn down when one fails). Each rank
initialises the process group (NCCL with one GPU per local rank when the trainer's device is not
``cpu`` and CUDA is visible, else Gloo on the CPU), builds the same model from the same seed, makes
its MoE layers expert-parallel and runs the ordinary :func:`fulu_nas.training.train.train` (data + expert
parallel, ``batch_size`` per rank). Rank 0 appends every :class:`~fulu_nas.training.train.StepReport` to
``reports.jsonl`` as it goes; at the end the experts are gathered
(:func:`fulu_nas.training.distributed.gather_experts`) and rank 0 saves the ordinary single-device weights
(``model.safetensors``) and ``result.json`` (its whole :class:`~fulu_nas.training.train.TrainResult` but the
reports). The parent streams the reports into the objective's callback while the ranks train (MLflow
steps, Optuna intermediate values, pruning), loads the weights into a plain
:class:`~fulu_nas.models.PiMoETransformer` and goes on exactly as for one device, so exports have the
same format whatever P was; the training result it returns is rank 0's (the step that ran, its
timings) with the streamed reports as its history.

Pruning acts on the streamed reports: when the pruner says stop, the parent creates ``stop`` in the
scratch folder; rank 0 sees it at its next report and every rank stops (so a pruned P-device trial
runs up to ``report_every`` steps more than a one-device one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from ..models import ArchConfig, PiMoETransformer, seeded_model
from .train import (
    BudgetCapReached,
    StepReport,
    StoppedByRankZero,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    resolve_device,
    train,
)


class ExpertParallelTrialError(RuntimeError):
    """The ranks failed (the message carries the rank-0 error or the launcher's last lines)."""


# What rank 0 sends of its TrainResult: all of it but the reports, which the parent has read as they came.
_RESULT_FIELDS = tuple(f.name for f in fields(TrainResult) if f.name != "history")


# -- parent side ------------------------------------------------------------------------------------

def train_expert_parallel(arch: ArchConfig, task_name: str, task_params: dict, cfg: TrainConfig,
                          on_report: Callable[[StepReport], None] | None = None, workdir: str | Path | None = None,
                          poll_s: float = 0.2) -> tuple[PiMoETransformer, TrainResult]:
    """Train ``arch`` on the task over ``cfg.expert_parallel`` ranks (module doc); returns the
    single-device model (on ``cfg.device``) and the training result. ``on_report`` is called in
    this process for every report, in order; when it raises, the ranks are stopped and the
    exception is re-raised. Raises :class:`~fulu_nas.training.train.TrainingDiverged` and
    :class:`~fulu_nas.training.train.BudgetCapReached` as ``train`` would."""
    P = cfg.expert_parallel
    if arch.moe.num_experts % P:
        raise ValueError(f"num_experts={arch.moe.num_experts} is not divisible by expert_parallel={P}")
    use_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() < P:
        raise ExpertParallelTrialError(f"expert_parallel={P} needs {P} GPUs (one per rank), "
                                       f"{torch.cuda.device_count()} visible")
    scratch = None if workdir is None else Path(workdir).resolve()
    with tempfile.TemporaryDirectory(prefix="ep-trial-", dir=scratch) as tmp:
        folder = Path(tmp)
        spec = {"arch": arch.to_dict(), "task": {"name": task_name, "params": task_params},
                "train": {**asdict(cfg), "progress": False, "dynamic_experts": None},
                "backend": "nccl" if use_cuda else "gloo", "out_dir": str(folder)}
        (folder / "spec.json").write_text(json.dumps(spec))
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = str(max(1, torch.get_num_threads() // P))
        # the ranks run this very fulu_nas, whatever the interpreter's own path would find
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={P}",
                   "-m", "fulu_nas.training.parallel", str(folder / "spec.json")]
        log_path = folder / "launch.log"
        reports = _ReportReader(folder / "reports.jsonl")
        history: list[StepReport] = []
        with open(log_path, "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                while True:
                    finished = proc.poll() is not None
                    for report in reports.new():
                        history.append(report)
                        if on_report is not None:
                            on_report(report)
                    if finished:
                        break
                    time.sleep(poll_s)
            except BaseException:
                (folder / "stop").touch()
                _wait(proc, timeout_s=120)
                raise
            finally:
                if proc.poll() is None:
                    _wait(proc, timeout_s=120)
        outcome = json.loads((folder / "result.json").read_text()) if (folder / "result.json").exists() else None
        # Rank 0 writes result.json once the experts are gathered (a collective every rank finished) and
        # the weights saved: an "ok" there is a finished training, whatever the exit status. A rank can
        # still abort as Gloo is torn down (a SIGABRT after the last step, in about one two-rank trial of
        # fifteen on a loaded 2-core machine), which must not fail a trial whose result is written.
        if outcome is None or outcome.get("status") != "ok":
            raise _failure(proc.returncode, outcome, log_path)
        model = PiMoETransformer(arch)
        from safetensors.torch import load_model

        load_model(model, str(folder / "model.safetensors"))
    result = TrainResult(**{name: outcome["result"][name] for name in _RESULT_FIELDS}, history=history)
    return model.to(resolve_device(cfg.device)), result


class _ReportReader:
    """The complete lines appended to a JSON-lines file since the last call."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def new(self) -> list[StepReport]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [StepReport(**json.loads(line)) for line in data[:end].decode().splitlines() if line.strip()]


def _wait(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _failure(returncode: int | None, outcome: dict | None, log_path: Path) -> Exception:
    if outcome is not None and outcome.get("status") == "diverged":
        return TrainingDiverged(outcome["step"], outcome["value"], outcome["reason"])
    if outcome is not None and outcome.get("status") == "capped":
        return BudgetCapReached(outcome["step"], outcome["steps"], outcome["seconds"], outcome["cap"])
    if outcome is not None and outcome.get("status") == "error":
        return ExpertParallelTrialError(f"rank 0: {outcome['type']}: {outcome['message']}")
    tail = log_path.read_text(errors="replace").strip().splitlines()[-15:] if log_path.exists() else []
    return ExpertParallelTrialError(f"expert-parallel launch exited with {returncode}: " + "\n".join(tail))


# -- rank side --------------------------------------------------------------------------------------

class _StopRequested(Exception):
    pass


def _reporter(folder: Path) -> Callable[[StepReport], None]:
    def report(r: StepReport) -> None:
        with open(folder / "reports.jsonl", "a") as f:
            f.write(json.dumps(asdict(r)) + "\n")
        if (folder / "stop").exists():
            raise _StopRequested(f"stopped by the search at step {r.step}")

    return report


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist
    from safetensors.torch import save_model

    from ..tasks import build_task
    from .distributed import expert_parallel, gather_experts, init_from_env

    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    folder = Path(spec["out_dir"])
    info = init_from_env(backend=spec["backend"], timeout_s=spec.get("timeout_s", 600))
    cfg = replace(TrainConfig(**spec["train"]), device=str(info.device))
    outcome: dict = {"status": "ok"}
    try:
        task = build_task(spec["task"]["name"], **spec["task"]["params"])
        arch = ArchConfig.from_dict(spec["arch"])
        # the same model on every rank, as the one-device trial builds it
        model = expert_parallel(seeded_model(arch, cfg.seed, info.device))
        result = train(model, task, cfg, callback=_reporter(folder) if info.rank == 0 else None)
        model = gather_experts(model)
        if info.rank == 0:
            save_model(model.cpu(), str(folder / "model.safetensors"))
        outcome["result"] = {name: getattr(result, name) for name in _RESULT_FIELDS}
    except TrainingDiverged as e:
        outcome = {"status": "diverged", "step": e.step, "value": e.value, "reason": e.reason}
    except BudgetCapReached as e:
        outcome = {"status": "capped", "step": e.step, "steps": e.steps, "seconds": e.seconds, "cap": e.cap}
    except (_StopRequested, StoppedByRankZero) as e:
        outcome = {"status": "stopped", "message": str(e)}
    except Exception as e:
        outcome = {"status": "error", "type": type(e).__name__, "message": str(e),
                   "traceback": traceback.format_exc()[-4000:]}
        traceback.print_exc()
    if info.rank == 0:
        (folder / "result.json").write_text(json.dumps(outcome))
    if outcome["status"] in ("ok", "stopped", "diverged", "capped"):
        # Every rank got here by the same decisions; tearing Gloo down while a peer still sends
        # aborts that peer ("Connection reset"), so leave together.
        dist.barrier()
    dist.destroy_process_group()
    return 0 if outcome["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())

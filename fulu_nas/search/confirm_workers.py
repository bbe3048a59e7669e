"""A confirmation on several worker processes (``fulu-nas confirm ... n_workers=N``; by default the
study's ``study.n_workers``).

The runs of a confirmation are independent and each is deterministic, so N processes
(:mod:`.confirm_worker`) take every N-th one, each with its share of the CPU threads or its own
GPU, as the search's workers do. Each records its results on the study
as a sequential confirmation does; this process shows them as they come and writes the summary.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import asdict

from .interrupts import raise_if_swallowed
from .private_files import settings_hold_password, write_config
from .settings import SearchSettings
from .study import INTERRUPTED, worker_env
from .worker_progress import progress_path, remove_all, running_lines

CONFIG_FILE = "confirm_config.json"
POLL_SECONDS = 5.0  # reading the study's results takes a noticeable share of a core when done every second;
# the workers' running steps (small files) are read every second


def run_in_workers(confirmation, todo: list, n_workers: int, bar) -> int:
    """Runs ``todo`` (``(candidate, seed)`` pairs of ``confirmation``'s plan) on ``n_workers``
    processes; 0, :data:`INTERRUPTED` when interrupted (the finished runs stay recorded), or 1 when a
    worker died (killed outright, out of memory, an error): its runs without a result are the
    confirmation's missing runs, and the run it left RUNNING is ended KILLED with the reason."""
    s: SearchSettings = confirmation.s
    config = s.output_dir / CONFIG_FILE
    config.parent.mkdir(parents=True, exist_ok=True)
    keys = {confirmation.key(c, seed): (c, seed) for c, seed in todo}
    # Each worker's runs, fixed here: a worker that works out its share when it starts could see
    # another's first result already recorded, and the shares would overlap or leave a gap.
    shares = [list(keys)[i::n_workers] for i in range(n_workers)]
    write_config(config, json.dumps({"config": s.raw, "output_dir": str(s.output_dir), "typed_model": s.typed_model,
                                     "shares": shares, "options": asdict(confirmation.plan.options)},
                                    indent=2, default=str), private=settings_hold_password(s))
    since = time.time()
    procs = []
    reports = [progress_path(s.output_dir, "confirm-worker", i) for i in range(n_workers)]
    interrupted = False
    try:
        for i in range(n_workers):
            log = open(s.output_dir / f"confirm-worker-{i}.log", "w")
            command = [sys.executable, "-m", "fulu_nas.search.confirm_worker", str(config), str(i)]
            procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env=worker_env(i, n_workers, s.train.expert_parallel)), log))
        read_at = -POLL_SECONDS
        while keys:
            running = any(p.poll() is None for p, _ in procs)
            if not running or time.monotonic() - read_at >= POLL_SECONDS:
                read_at = time.monotonic()
                for key, line in confirmation.finished_lines(keys, since):
                    keys.pop(key)
                    bar.finished(line)
            if not running:
                break
            bar.show_running(running_lines(reports))
            time.sleep(1.0)
            raise_if_swallowed()
    except KeyboardInterrupt:
        interrupted = True
        # A Ctrl-C at the terminal reaches the workers too; a signal may have reached this process alone
        # (`kill PID`, `kill -INT PID`, `docker stop`), so it is passed on (a worker ignores the signals
        # after its first).
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
    finally:
        for p, log in procs:
            p.wait()
            log.close()
        remove_all(reports)
    stopped = (0, INTERRUPTED, *((-signal.SIGTERM, -signal.SIGINT) if interrupted else ()))  # a worker stopped
    # by the interrupt before it could take signals
    failed = [i for i, (p, _) in enumerate(procs) if p.returncode not in stopped]
    reasons = {}
    for i in failed:
        how = exit_description(procs[i][0].returncode)
        print(f"confirmation worker {i} exited with {how}; see {s.output_dir / f'confirm-worker-{i}.log'}",
              file=sys.stderr)
        reasons.update({key: f"confirmation worker {i} exited with {how} during this run; it has no result: run "
                             "the same command again to train it" for key in shares[i]})
    # Every worker has exited: a run still RUNNING is one a dead worker could not end.
    confirmation.close_stale(reasons)
    if interrupted:
        return INTERRUPTED
    return 1 if failed else 0


def exit_description(code: int) -> str:
    """``-9 (SIGKILL: ...)`` for a worker's exit code."""
    if code >= 0:
        return f"{code} (an error)"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"{code} (signal {-code})"
    if -code == signal.SIGKILL:
        return f"{code} ({name}: killed outright, as the kernel's out-of-memory killer does)"
    return f"{code} ({name})"

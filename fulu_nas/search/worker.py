"""A worker process started by ``fulu-nas search study.n_workers=N``:
``python -m fulu_nas.search.worker <output dir>/search_config.json <worker index>``."""

from __future__ import annotations

import sys

from .interrupts import stop_with_parent
from .study import INTERRUPTED, load_worker_settings, run_worker, stop_signals_as_interrupt
from .worker_progress import ProgressFile, progress_path


def main(argv: list[str]) -> int:
    config, index = argv
    if not stop_with_parent():
        return INTERRUPTED
    s = load_worker_settings(config)
    with stop_signals_as_interrupt():
        return run_worker(s, int(index), progress=False,
                          report_to=ProgressFile(progress_path(s.output_dir, "worker", int(index))))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

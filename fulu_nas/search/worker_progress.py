"""What each local worker process is running, for the progress bar of the process that started it
(``study.n_workers`` > 1 in ``fulu-nas search`` and ``fulu-nas confirm``).

A worker replaces a small JSON file in the output folder at every training report (what it runs, the
step, the loss) and removes it when the run ends; the parent reads them while it waits. A file rather
than the study's storage: a report costs no database write, and the parent shows exactly the workers
it started.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def progress_path(output_dir: Path, kind: str, index: int) -> Path:
    """Worker ``index``'s file (``kind``: "worker" for a search, "confirm-worker" for a confirmation)."""
    return Path(output_dir) / f".{kind}-{index}.progress.json"


class ProgressFile:
    """The file one worker reports to; ``None`` as a path reports nowhere (a lone process)."""

    def __init__(self, path: Path | None):
        self.path = path

    def report(self, label: str, step: int, loss: float) -> None:
        if self.path is None:
            return
        partial = self.path.with_name(self.path.name + ".partial")
        try:
            partial.write_text(json.dumps({"label": label, "step": step, "loss": loss}))
            os.replace(partial, self.path)  # a reader sees the last report or the one before, never half of one
        except OSError:  # a full disk, say: the parent's bar misses a report, the trial goes on
            pass

    def clear(self) -> None:
        if self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)


def running_lines(paths: list[Path]) -> list[str]:
    """``"trial 3: step 200 loss 2.9312"`` for each worker in ``paths`` that is running something."""
    lines = []
    for path in paths:
        try:
            data = json.loads(path.read_text())
            lines.append(f"{data['label']}: step {int(data['step'])} loss {float(data['loss']):.4f}")
        except (OSError, ValueError, KeyError, TypeError):  # not running anything now, or just ending
            continue
    return lines


def remove_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".partial").unlink(missing_ok=True)

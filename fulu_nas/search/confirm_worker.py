"""A confirmation worker started by ``fulu-nas confirm ... n_workers=N`` (:mod:`.confirm_workers`):
``python -m fulu_nas.search.confirm_worker <output dir>/confirm_config.json <worker index>``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna

from .confirm import CONFIRM_STOPPING, Confirmation, plan_confirmation
from .interrupts import stop_with_parent
from .settings import ConfirmSettings
from .storage import open_study_storage
from .study import INTERRUPTED, load_worker_settings, quiet_optuna, stop_signals_as_interrupt
from .worker_progress import ProgressFile, progress_path


def main(argv: list[str]) -> int:
    """0, or 130 when stopped by Ctrl-C or SIGTERM (the running run ended KILLED)."""
    config, index = argv[0], int(argv[1])
    if not stop_with_parent():
        return INTERRUPTED
    with stop_signals_as_interrupt(CONFIRM_STOPPING):  # SIGTERM as Ctrl-C: the running run ends KILLED
        try:
            s = load_worker_settings(config)
            data = json.loads(Path(config).read_text())
            with quiet_optuna():
                # read as the confirmation's own process reads it: a search's resume checks (the device its
                # latency was measured on) are not a confirmation's, which trains on this device alone
                study = optuna.load_study(study_name=s.study.name, storage=open_study_storage(s.storage_url))
                plan = plan_confirmation(study, s, ConfirmSettings(**data["options"]))
                report_to = ProgressFile(progress_path(s.output_dir, "confirm-worker", index))
                return Confirmation(study, s, plan, progress=False).run_share(set(data["shares"][index]), report_to)
        except KeyboardInterrupt:
            return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

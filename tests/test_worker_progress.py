"""The files through which worker processes show their running work on their parent's bar, and the
interrupts that wait for a block of database writes."""

from __future__ import annotations

from fulu_nas.search.worker_progress import ProgressFile, progress_path, remove_all, running_lines


def test_a_report_replaces_the_last_and_the_parent_reads_each_running_worker(tmp_path):
    paths = [progress_path(tmp_path, "worker", i) for i in range(3)]
    first, second = ProgressFile(paths[0]), ProgressFile(paths[1])
    first.report("trial 3", 100, 2.5)
    first.report("trial 3", 200, 2.25)
    second.report("trial 4 seed 1", 50, 3.0)
    paths[2].write_text('{"label": "trial 5", "st')  # a file not written by ProgressFile: skipped
    assert running_lines(paths) == ["trial 3: step 200 loss 2.2500", "trial 4 seed 1: step 50 loss 3.0000"]
    first.clear()
    assert running_lines(paths) == ["trial 4 seed 1: step 50 loss 3.0000"]
    assert not list(tmp_path.glob("*.partial"))
    remove_all(paths)
    assert not list(tmp_path.iterdir())


def test_a_lone_process_reports_nowhere(tmp_path):
    lone = ProgressFile(None)
    lone.report("trial 0", 10, 1.0)
    lone.clear()
    assert not list(tmp_path.iterdir())


def test_a_report_that_cannot_be_written_does_not_stop_the_worker(tmp_path):
    """The file only feeds the parent's bar: a write that fails (a full disk, a folder gone) must not
    fail the trial that reports."""
    gone = ProgressFile(tmp_path / "missing-folder" / ".worker-0.progress.json")
    gone.report("trial 1", 10, 2.0)
    gone.clear()
    assert running_lines([gone.path]) == []


def test_a_signal_inside_a_block_of_database_writes_is_raised_when_the_block_ends():
    """A KeyboardInterrupt inside an MLflow write once left its SQLite database locked: the search then
    failed ending the interrupted trial's runs and exited 1 with a traceback."""
    import os
    import signal

    import pytest

    from fulu_nas.search.interrupts import between_writes
    from fulu_nas.search.study import stop_signals_as_interrupt

    for signum in (signal.SIGTERM, signal.SIGINT):
        done = []
        with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):
            with between_writes():
                os.kill(os.getpid(), signum)
                done.append("the write finished")
        assert done == ["the write finished"]
    with stop_signals_as_interrupt(), pytest.raises(KeyboardInterrupt):  # outside a write: at once
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_worker_that_ended_but_was_not_reaped_is_gone():
    """A killed worker its parent had not reaped yet (a zombie) answered kill(pid, 0) as a live process:
    its trial was never failed, and the other workers waited for it for ever."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from fulu_nas.deploy.processes import process_is_gone

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while time.time() < deadline and not open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].startswith(" Z"):
            time.sleep(0.05)  # ended, not reaped: no poll() or wait() until the check below
        assert process_is_gone(f"{socket.gethostname()}:{child.pid}")
    finally:
        child.wait()
    assert process_is_gone(f"{socket.gethostname()}:{child.pid}")
    assert not process_is_gone(f"{socket.gethostname()}:{os.getpid()}")  # this process, alive

"""One writer per run directory: a concurrent second `gradreg train` on the same --out exits 2
at once; a lock left by a killed process does not block --resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradreg.lock import LOCK_NAME, RunLockedError, run_lock

SRC = str(Path(__file__).resolve().parents[1] / "src")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks only")


def _gradreg(*args: str) -> list[str]:
    return [sys.executable, "-m", "gradreg", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wait_for_holder(lock: Path, proc: subprocess.Popen[bytes], *, timeout_s: float = 60) -> None:
    """Until the first process has written its pid into the lock file (it holds the lock)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the first writer never took the lock")


def test_second_writer_fails_at_once_and_killed_lock_does_not_block_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--model", "mlp", "--set", "model_params.hidden=[8]", "--epochs", "500",
            "--out", str(out), "--quiet", "--device", "cpu"]
    first = subprocess.Popen(_gradreg(*args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_holder(out / LOCK_NAME, first)
        second = subprocess.run(_gradreg(*args), env=_env(), capture_output=True, text=True, timeout=120)
        assert first.poll() is None  # the first is still writing
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and "being written by another gradreg process" in err[0] and str(first.pid) in err[0]
    finally:
        first.send_signal(signal.SIGKILL)  # dies holding the lock; the lock file stays behind
        first.wait()
    assert (out / LOCK_NAME).is_file()
    resumed = subprocess.run(_gradreg(*args, "--resume", "--stop-after-epoch", "1"), env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr


def test_lock_in_process(tmp_path: Path) -> None:
    with run_lock(tmp_path):
        pass
    with run_lock(tmp_path):  # released on exit: a later writer gets it
        pass
    with run_lock(tmp_path):
        # a second descriptor in the same process conflicts too (flock is per open file)
        with pytest.raises(RunLockedError, match="being written by another gradreg process"):
            with run_lock(tmp_path):
                pass

"""kill -9 and concurrent runs on one training run folder.

A real ``python -m wsi_pipeline train`` is started on a copy of the ``small_cohort`` fixture with
the options of the ``fast_run`` fixture. While it runs, a second ``train --out`` into the same
folder stops at once with one line (the per-run lock). The first is then killed with SIGKILL;
the rerun takes over the dead process's lock (one warning), exits 0 and gives exactly the model of
the uninterrupted ``fast_run`` (``--resume`` when an epoch's checkpoint was written, bit for bit).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from wsi_pipeline import runs
from wsi_pipeline.cli import main
from wsi_pipeline.locks import lock_path

ROOT = Path(__file__).resolve().parents[1]
FAST_ARGS = [  # helpers.FAST as train options
    *("--model", "abmil", "--epochs", "2", "--max-patches", "16"),
    *("--workers", "0", "--patience", "5"),
]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"train ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("kill_at", ["lock", pytest.param("checkpoint", marks=pytest.mark.slow)])
def test_kill9_train_then_rerun_gives_the_clean_model(
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kill_at: str,
) -> None:
    stores, labels = small_cohort
    run = tmp_path / "run"
    args = ["train", str(stores), "--labels", str(labels), "--out", str(run), "-q", *FAST_ARGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "wsi_pipeline", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lock_path(run), proc)
        # a second training into the same folder, while the first runs: one line, exit 1
        assert main(args) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "another training is writing this run folder" in err[0], err
        assert f"pid {proc.pid}" in err[0]
        if kill_at == "checkpoint":
            wait_for(run / runs.CHECKPOINT, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not runs.is_finished(run)  # a killed run is never taken as finished
    resume = ["--resume"] if (run / runs.CHECKPOINT).is_file() else []
    assert main([*args, *resume]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "taking over the lock" in err
    assert runs.is_finished(run) and not lock_path(run).exists()
    got = torch.load(run / runs.MODEL, weights_only=True)
    want = torch.load(fast_run / runs.MODEL, weights_only=True)
    assert all(torch.equal(got[k], want[k]) for k in want)

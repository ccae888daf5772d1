"""kill -9 and concurrent runs on one training run folder.

A real ``python -m wsi_pipeline train`` is started on a copy of the ``small_cohort`` fixture with
the options of the ``fast_run`` fixture. While it runs, a second ``train --out`` into the same
folder stops at once with one line (the per-run lock). The first is then killed with SIGKILL;
the rerun takes over the dead process's lock (one warning), exits 0 and gives exactly the model of
the uninterrupted ``fast_run`` (``--resume`` when an epoch's checkpoint was written, bit for bit).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from helpers import start_cli, wait_until

from wsi_pipeline import runs
from wsi_pipeline.cli import main
from wsi_pipeline.locks import lock_path

FAST_ARGS = [  # helpers.FAST as train options
    *("--model", "abmil", "--epochs", "2", "--max-patches", "16"),
    *("--workers", "0", "--patience", "5"),
]


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
    proc = start_cli(args)
    try:
        wait_until(lock_path(run).exists, proc, "the run's lock file")
        # a second training into the same folder, while the first runs: one line, exit 1
        assert main(args) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "another training is writing this run folder" in err[0], err
        assert f"pid {proc.pid}" in err[0]
        if kill_at == "checkpoint":
            wait_until((run / runs.CHECKPOINT).exists, proc, "the first checkpoint")
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

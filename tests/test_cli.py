"""The command line: entry points, exit statuses, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wsi_pipeline import __version__
from wsi_pipeline.cli import main

COMMANDS = ["tile", "train", "predict", "heatmap", "run", "synth"]


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in COMMANDS:
        assert cmd in out
    for cmd in COMMANDS:
        assert main([cmd, "--help"]) == 0


def test_module_and_console_script() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "wsi_pipeline", "--help"], capture_output=True, text=True, check=True
    )
    assert "Usage: wsi-pipeline" in r.stdout
    script = Path(sys.executable).with_name("wsi-pipeline")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert __version__ in r.stdout


def test_import_does_not_import_torch() -> None:
    code = (
        "import sys, wsi_pipeline, wsi_pipeline.cli, wsi_pipeline.tiling, "
        "wsi_pipeline.heatmap, wsi_pipeline.store; print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["synth", str(tmp_path / "c"), "--n-slides", "2", "--width", "768", "--height", "512", "-q"]
    )
    assert code == 0
    assert "2 slides" in capsys.readouterr().out
    assert (tmp_path / "c" / "labels.csv").is_file()


def test_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "wsi_pipeline",
        "train",
        str(tmp_path),
        "--labels",
        str(tmp_path / "missing.csv"),
        "--out",
        str(tmp_path / "run"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "labels file not found" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([*cmd, "--debug"], capture_output=True, text=True)
    assert "Traceback" in r.stderr


def test_bad_usage_is_exit_2(tmp_path: Path) -> None:
    assert main(["tile"]) == 2
    assert main(["nonsense"]) == 2
    assert main(["train", str(tmp_path), "--labels", "x.csv", "--out", "r", "--mode", "x"]) == 2


def test_heatmap_without_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from wsi_pipeline.specs import TilingSpec
    from wsi_pipeline.synth import write_slide
    from wsi_pipeline.tiling import tile_slide

    write_slide(tmp_path / "s.svs", width=768, height=512, mpp=0.5, seed=1)
    tile_slide(tmp_path / "s.svs", tmp_path / "stores", spec=TilingSpec(tile_px=64))
    code = main(
        [
            "heatmap",
            str(tmp_path / "stores"),
            "--run",
            str(tmp_path / "myrun"),
            "--out",
            str(tmp_path / "heat"),
            "-q",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "no 'scores/myrun'" in err and "wsi-pipeline predict" in err

"""The command line: entry points, exit statuses, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest

from wsi_pipeline import __version__
from wsi_pipeline.cli import cli, main
from wsi_pipeline.specs import TILE_OPTIONS, TRAIN_OPTIONS, TrainConfig, tiling_from_options
from wsi_pipeline.store import SlideStore
from wsi_pipeline.synth import LESION_STYLES

COMMANDS = [
    "tile",
    "features",
    "pretrain",
    "train",
    "predict",
    "evaluate",
    "heatmap",
    "run",
    "synth",
    "export",
    "report",
    "view",
]


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


def test_every_public_name_resolves() -> None:
    """Every name in ``wsi_pipeline.__all__`` (the lazy ones too) imports and is documented."""
    import wsi_pipeline as wp

    for name in wp.__all__:
        obj = getattr(wp, name)
        assert name == "__version__" or obj.__doc__, name
    assert set(wp.__all__) <= set(dir(wp))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = wp.nope


def test_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["synth", str(tmp_path / "c"), "--n-slides", "2", "--width", "768", "--height", "512", "-q"]
    )
    assert code == 0
    assert "2 slides" in capsys.readouterr().out
    assert (tmp_path / "c" / "labels.csv").is_file()


def test_synth_lesion_style(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    option = next(p for p in cli.commands["synth"].params if p.name == "lesion_style")
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == LESION_STYLES  # the command offers every style
    argv = ["synth", str(tmp_path / "c"), "--n-slides", "1", "--width", "512", "--height", "384"]
    assert main([*argv, "--lesion-style", "morphology", "-q"]) == 0
    assert "lesion style: morphology" in capsys.readouterr().out
    meta = json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert meta["parameters"]["slide_options"] == {"lesion_style": "morphology"}
    assert main([*argv, "--lesion-style", "cancer"]) == 2
    err = capsys.readouterr().err
    assert "--lesion-style" in err and "'cancer'" in err


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


def test_heatmap_without_predictions(
    tiled_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "heatmap",
            str(tiled_store.parent),
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


# ---------------------------------------------------------------------------------------------
# options: help, defaults, and the one map to the specs
# ---------------------------------------------------------------------------------------------
def _options(name: str) -> list[click.Option]:
    cmd = cli if name == "" else cli.commands[name]
    return [p for p in cmd.params if isinstance(p, click.Option)]


@pytest.mark.parametrize("name", ["", *COMMANDS])
def test_every_option_has_help_and_shows_its_default(name: str) -> None:
    cmd = cli if name == "" else cli.commands[name]
    ctx = click.Context(cmd, info_name=name or "wsi-pipeline")
    for opt in _options(name):
        assert opt.help and opt.help.strip(), f"{name} {opt.opts[0]}: no help"
        if opt.required or opt.is_flag or opt.multiple:
            continue  # nothing to show: required, off unless given, or none unless given
        default = opt.get_default(ctx, call=False)
        if default is not None:
            shown = opt.get_help_extra(ctx).get("default")
            assert shown == str(default), f"{name} {opt.opts[0]}: default {default!r} not shown"


def test_train_options_show_the_config_defaults() -> None:
    """Training options default to None (a --config file may set them); their help shows the
    TrainConfig default."""
    config = TrainConfig()
    for opt in _options("train"):
        assert opt.name is not None
        alias = TRAIN_OPTIONS.get(opt.name)
        field = alias.field if alias is not None else opt.name
        if hasattr(config, field) and opt.name != "folds" and not opt.is_flag:
            assert opt.help is not None and "[default: " in opt.help, opt.name


def test_tile_and_train_options_are_the_spec_map() -> None:
    tile = {o.name for o in cli.commands["tile"].params} - {"slides", "out", "quiet", "debug"}
    assert tile == set(TILE_OPTIONS)
    train = {o.name for o in cli.commands["train"].params}
    train -= {"stores", "labels_csv", "out", "config_file", "resume", "stop_after"}
    train -= {"quiet", "debug"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert train <= fields | set(TRAIN_OPTIONS), train - fields - set(TRAIN_OPTIONS)


def test_tile_command_writes_the_spec_of_the_pipeline_options(
    synth_slide: Path, tmp_path: Path
) -> None:
    """``tile --opt`` and a pipeline file's ``tile: {opt: ...}`` give the same spec."""
    argv = ["--tile-size", "96", "--overlap", "32", "--tissue-threshold", "0.1"]
    argv += ["--keep-pen", "--codec", "zstd", "--patches-per-shard", "16"]
    assert main(["tile", str(synth_slide), "--out", str(tmp_path / "st"), "-q", *argv]) == 0
    written = SlideStore(tmp_path / "st" / "s.zarr").tiling["spec"]
    options = {"tile_size": 96, "overlap": 32, "tissue_threshold": 0.1, "keep_pen": True}
    options.update(codec="zstd", patches_per_shard=16)
    spec, batch = tiling_from_options(options)
    assert written == spec.to_dict() and batch == {}
    assert written["level"] == 0 and written["mpp"] is None  # no mpp: level 0
    assert written["mask"]["remove_pen"] is False and written["mask"]["remove_dark"] is True


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mpp", "1", "--level", "0"], "mpp (1.0) or level (0), not both"),
        (["--workers", "0"], "workers must be >= 1, not 0"),
        (["--tile-size", "4"], "tile size must be between 8 and 4096 px, not 4"),
    ],
)
def test_tile_bad_options_are_exit_2(
    synth_slide: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert main(["tile", str(synth_slide), "--out", str(tmp_path / "st"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "st").exists()


def test_train_bad_folds_and_precision_are_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["train", str(tmp_path), "--labels", "x.csv", "--out", str(tmp_path / "r")]
    assert main([*base, "--folds", "1"]) == 2
    assert "folds must be >= 2" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("precision: half\n")
    assert main([*base, "--config", str(cfg)]) == 2
    assert "precision must be 'amp' or 'fp32', not 'half'" in capsys.readouterr().err


def test_a_file_name_with_a_newline_cannot_forge_a_log_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "evil\nINFO: all slides ok.svs"
    bad.write_bytes(b"not a slide")
    assert main(["tile", str(bad), "--out", str(tmp_path / "out")]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and not any(line.startswith("INFO: all slides ok") for line in lines), lines
    assert any("evil\\nINFO: all slides ok.svs" in line for line in lines), lines

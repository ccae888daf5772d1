"""The specs: their validation, the "same tiling" rule, and the one map from user options."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.specs import (
    PREDICT_OPTIONS,
    TILE_OPTIONS,
    TILING_TOLERANCE,
    TRAIN_OPTIONS,
    MaskSpec,
    SlideMeta,
    TilingSpec,
    TrainConfig,
    fold_config,
    tiling_from_options,
    tiling_mismatch,
    train_config_from_options,
)


# ---------------------------------------------------------------------------------------------
# TilingSpec / MaskSpec / SlideMeta
# ---------------------------------------------------------------------------------------------
def test_level_zero_when_no_mpp() -> None:
    assert TilingSpec().level == 0 and TilingSpec().mpp is None
    assert TilingSpec(mpp=0.5).level is None
    assert TilingSpec(level=2).level == 2
    with pytest.raises(ConfigError, match=r"mpp \(0\.5\) or level \(0\), not both"):
        TilingSpec(mpp=0.5, level=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile_px": 4}, "tile size must be between 8 and 4096 px, not 4"),
        ({"tile_px": 64, "overlap_px": 64}, r"overlap must be >= 0 and smaller than the tile size"),
        ({"min_tissue": 1.5}, r"tissue threshold must be in \[0, 1\], not 1.5"),
        ({"edge": "wrap"}, "edge must be 'pad' or 'drop', not 'wrap'"),
        ({"codec": "png"}, "codec must be 'jpeg', 'zstd' or 'raw', not 'png'"),
        ({"mpp": 0.001}, "mpp must be a resolution in µm per pixel"),
        ({"level": -1}, "level must be >= 0, not -1"),
        ({"jpeg_quality": 0}, r"jpeg quality must be in 1\.\.100, not 0"),
    ],
)
def test_tiling_spec_refuses_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TilingSpec(**kwargs)


def test_mask_spec_checks() -> None:
    with pytest.raises(ConfigError, match="needs a user_mask file"):
        MaskSpec(method="user")
    with pytest.raises(ConfigError, match="mask method must be 'otsu' or 'user', not 'li'"):
        MaskSpec(method="li")


def test_specs_round_trip_through_dicts() -> None:
    spec = TilingSpec(tile_px=128, mpp=1.0, mask=MaskSpec(remove_pen=False))
    assert TilingSpec.from_dict(spec.to_dict()) == spec
    assert TilingSpec.from_dict(TilingSpec().to_dict()) == TilingSpec()
    meta = SlideMeta(
        path="/x.svs",
        file_size=10,
        backend="tiffslide",
        vendor="aperio",
        width=300,
        height=200,
        level_dimensions=((300, 200), (150, 100)),
        level_downsamples=(1.0, 2.0),
        mpp_x=0.5,
        mpp_y=0.25,
        tile_wh=(64, 64),
    )
    assert SlideMeta.from_dict(meta.to_dict()) == meta
    assert meta.mpp == 0.375 and meta.level_count == 2
    assert dataclasses.replace(meta, mpp_y=None).mpp is None
    config = TrainConfig(epochs=3, num_workers=0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})


# ---------------------------------------------------------------------------------------------
# the "same tiling" rule
# ---------------------------------------------------------------------------------------------
def test_tiling_mismatch() -> None:
    ref = {"tile_px": 64, "mpp": 1.0, "downsample": 2.0}
    assert tiling_mismatch(dict(ref), ref) is None
    near = {**ref, "mpp": 1.0 + TILING_TOLERANCE / 2}
    assert tiling_mismatch(near, ref) is None
    assert tiling_mismatch({**ref, "tile_px": 96}, ref) == (
        "tile size 96 px, the run was trained on 64 px"
    )
    assert tiling_mismatch({**ref, "mpp": 2.0}, ref, reference_name="'a' was tiled") == (
        "tiled at 2 mpp, 'a' was tiled at 1 mpp"
    )
    no_mpp = {"tile_px": 64, "mpp": None, "downsample": 4.0}
    assert "downsample 4, the run was trained at downsample 2 (no mpp" in str(
        tiling_mismatch(no_mpp, ref)
    )
    assert tiling_mismatch({**no_mpp, "downsample": 2.0}, ref) is None


# ---------------------------------------------------------------------------------------------
# user options -> specs
# ---------------------------------------------------------------------------------------------
def test_option_tables_name_real_fields() -> None:
    from wsi_pipeline.tile_batch import tile_slides

    targets = {
        "tiling": {f.name for f in dataclasses.fields(TilingSpec)},
        "mask": {f.name for f in dataclasses.fields(MaskSpec)},
        "batch": set(inspect.signature(tile_slides).parameters),
        "train": {f.name for f in dataclasses.fields(TrainConfig)},
        "folds": {"folds"},
    }
    for name, opt in {**TILE_OPTIONS, **TRAIN_OPTIONS}.items():
        assert opt.field in targets[opt.target], name


def test_predict_options_are_predict_keywords() -> None:
    from wsi_pipeline.prediction import predict

    params = inspect.signature(predict).parameters
    for opt in PREDICT_OPTIONS.values():
        assert params[opt.field].kind is inspect.Parameter.KEYWORD_ONLY


def test_tiling_from_options_renames_and_negates(tmp_path: Path) -> None:
    mask = tmp_path / "m.png"
    mask.write_bytes(b"")  # the mask file must exist; it is read when a slide is tiled
    spec, batch = tiling_from_options(
        {
            "tile_size": 128,
            "overlap": 32,
            "tissue_threshold": 0.5,
            "mpp": 1.0,
            "keep_pen": True,
            "keep_dark": False,
            "mask_file": str(mask),
            "workers": 2,
            "overwrite": True,
            "slide_mpp": None,  # None: not given
        }
    )
    assert (spec.tile_px, spec.overlap_px, spec.min_tissue) == (128, 32, 0.5)
    assert spec.mpp == 1.0 and spec.level is None
    assert spec.mask == MaskSpec(method="user", user_mask=str(mask), remove_pen=False)
    assert batch == {"workers": 2, "overwrite": True}
    assert tiling_from_options({}) == (TilingSpec(), {})
    assert tiling_from_options({"mpp": None, "level": None})[0].level == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"tile_px": 64}, "unknown tile option"),
        ({"workers": 0}, "workers must be >= 1, not 0"),
        ({"mpp": 0.5, "level": 1}, "not both"),
        ({"overlap": 300}, "overlap must be >= 0 and smaller than the tile size"),
        ({"mask_file": "nowhere.png"}, r"nowhere\.png: mask file not found"),
    ],
)
def test_tiling_from_options_refuses(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiling_from_options(options)


def test_train_config_from_options() -> None:
    config, folds = train_config_from_options(
        {"epochs": 3, "workers": 0, "precision": "fp32", "folds": 4, "seed": None}
    )
    assert config == TrainConfig(epochs=3, num_workers=0, amp=False)
    assert folds == 4 and config.folds is None
    # later layers win (a --config file, then the command line), under either name
    config, folds = train_config_from_options({"num_workers": 2, "lr": 0.1}, {"workers": 3})
    assert (config.num_workers, config.lr, folds) == (3, 0.1, None)
    assert train_config_from_options({"precision": "amp"})[0].amp is True


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"workers": 1, "num_workers": 1},
            "'workers' and 'num_workers' set the same option: give one",
        ),
        ({"precision": "half"}, "precision must be 'amp' or 'fp32', not 'half'"),
        ({"folds": 1}, "folds must be >= 2"),
        ({"epochz": 1}, "unknown training option"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"color_jitter": 1.5}, r"color_jitter must be in \[0, 1\), not 1.5"),
    ],
)
def test_train_config_from_options_refuses(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        train_config_from_options(options)


def test_fold_config() -> None:
    base = TrainConfig(epochs=2, test_fraction=0.3)
    cfg = fold_config(base, folds=3, fold=2)
    assert (cfg.folds, cfg.fold, cfg.test_fraction, cfg.epochs) == (3, 2, 0.0, 2)
    for folds, fold in ((1, 0), (3, 3), (3, -1)):
        with pytest.raises(ConfigError, match="folds must be >= 2 and 0 <= fold < folds"):
            fold_config(base, folds=folds, fold=fold)

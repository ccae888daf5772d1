"""Stitching: the lower tercile of the scores where patches overlap (the default), the lowest,
and exact area-weighted means, block independence, normalised smoothing, the memory bound on a gigapixel slide,
percentile ranks and display modes."""

from __future__ import annotations

import numpy as np
import pytest

from wsi_pipeline import stitch
from wsi_pipeline.errors import ConfigError


def test_overlap_takes_the_lowest_score_with_min() -> None:
    """combine="min": two patches with scores 0.2 and 1 overlapping by half: a pixel is only as
    abnormal as the least abnormal patch over it, so the abnormal region is where only the
    second lies; a pixel that a patch overlaps by a fraction takes its score too. With 2
    patches over a pixel the default (lower tercile) is the lowest too."""
    coords = np.array([[0, 0], [2, 0]])
    for combine in ("min", "tercile"):
        values, coverage = stitch.stitch_scores(
            coords, np.array([0.2, 1.0]), patch_l0=4, slide_wh=(8, 4), downsample=1, combine=combine
        )
        np.testing.assert_allclose(values[0, :6], [0.2, 0.2, 0.2, 0.2, 1, 1], atol=1e-6)
        assert np.isnan(values[:, 6:]).all()
        np.testing.assert_allclose(coverage[0], [1, 1, 2, 2, 1, 1, 0, 0], atol=1e-6)
    part, _ = stitch.stitch_scores(
        np.array([[0, 0], [1, 0]]),
        np.array([1.0, 0.0]),
        patch_l0=2,
        slide_wh=(4, 2),
        downsample=2,
        combine="min",
    )
    np.testing.assert_allclose(part[0], [0.0, 0.0], atol=1e-6)
    with pytest.raises(ConfigError, match="combine must be one of tercile, min, mean, not 'max'"):
        stitch.stitch_scores(
            coords, np.zeros(2), patch_l0=4, slide_wh=(8, 4), downsample=1, combine="max"
        )


def test_the_default_takes_the_second_lowest_of_four_patches() -> None:
    """50 % overlap in both directions: 4 patches over each inner pixel. The default (lower
    tercile) takes the second lowest of their scores, so one patch that missed a lesion does not
    remove it, while two do; min takes the lowest, mean the average."""
    coords = np.array([[0, 0], [2, 0], [0, 2], [2, 2]])  # 4 x 4 patches, stride 2
    scores = np.array([0.1, 0.9, 0.8, 0.7])
    kw = dict(patch_l0=4, slide_wh=(6, 6), downsample=1)
    values, _ = stitch.stitch_scores(coords, scores, **kw)
    assert values.shape == (6, 6)
    assert values[3, 3] == pytest.approx(0.7)  # all 4 over it: the second lowest of 0.1..0.9
    assert values[0, 0] == pytest.approx(0.1)  # one patch over it
    assert values[0, 3] == pytest.approx(0.1)  # two (0.1, 0.9): the lower
    low, _ = stitch.stitch_scores(coords, scores, combine="min", **kw)
    mean, _ = stitch.stitch_scores(coords, scores, combine="mean", **kw)
    assert low[3, 3] == pytest.approx(0.1) and mean[3, 3] == pytest.approx(0.625)
    nine = np.array([[x, y] for y in (0, 1, 2) for x in (0, 1, 2)])  # 9 patches over (2, 2)
    ranked, _ = stitch.stitch_scores(
        nine, np.arange(9, dtype=float) / 10, patch_l0=3, slide_wh=(5, 5), downsample=1
    )
    assert ranked[2, 2] == pytest.approx(0.2)  # the third lowest of 9: (9 - 1) // 3 + 1 = 3


def test_without_overlap_the_rules_agree() -> None:
    """Patches on a grid whose borders fall on heatmap pixel borders: the same map either way."""
    ys, xs = np.mgrid[0:1000:100, 0:1500:100]
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    scores = np.random.default_rng(3).random(len(coords))
    kw = dict(patch_l0=100, slide_wh=(1500, 1000), downsample=10)
    mean, cov = stitch.stitch_scores(coords, scores, combine="mean", **kw)
    for combine in ("tercile", "min"):
        got, cov2 = stitch.stitch_scores(coords, scores, combine=combine, **kw)
        np.testing.assert_allclose(got, mean, atol=1e-6)
        np.testing.assert_array_equal(cov, cov2)


def test_overlap_is_averaged_exactly() -> None:
    """combine="mean": two patches with scores 0 and 1 overlapping by half, 0.5 in the overlap."""
    coords = np.array([[0, 0], [2, 0]])
    values, coverage = stitch.stitch_scores(
        coords, np.array([0.0, 1.0]), patch_l0=4, slide_wh=(8, 4), downsample=1, combine="mean"
    )
    assert values.shape == (4, 8) and values.dtype == np.float32
    np.testing.assert_allclose(values[0, :6], [0, 0, 0.5, 0.5, 1, 1], atol=1e-6)
    assert np.isnan(values[:, 6:]).all()
    np.testing.assert_allclose(coverage[0], [1, 1, 2, 2, 1, 1, 0, 0], atol=1e-6)


def test_fractional_overlap_is_area_weighted() -> None:
    """A heatmap pixel overlapped 2/2 by one patch and 1/2 by another: weights 2 and 1."""
    coords = np.array([[0, 0], [1, 0]])
    values, coverage = stitch.stitch_scores(
        coords, np.array([0.0, 1.0]), patch_l0=2, slide_wh=(4, 2), downsample=2, combine="mean"
    )
    np.testing.assert_allclose(values[0], [1 / 3, 1.0], atol=1e-6)
    np.testing.assert_allclose(coverage[0], [1.5, 0.5], atol=1e-6)


@pytest.mark.parametrize("combine", stitch.COMBINE)
@pytest.mark.parametrize("sigma_um", [0.0, 5.0, 40.0])  # none, direct, FFT
def test_blocks_equal_one_block(sigma_um: float, combine: str) -> None:
    rng = np.random.default_rng(1)
    coords = rng.integers(-100, 3000, size=(400, 2))
    scores = rng.random(400)
    mask = rng.random((40, 60)) > 0.3
    kw = dict(
        patch_l0=223.5,
        slide_wh=(3000, 2000),
        downsample=7.3,
        tissue_mask=mask,
        mask_downsample=50.0,
        sigma_um=sigma_um,
        mpp=0.5,
        combine=combine,
    )
    ref, ref_cov = stitch.stitch_scores(coords, scores, block_px=10**6, **kw)
    got, got_cov = stitch.stitch_scores(coords, scores, block_px=13, **kw)
    assert ref.shape == (stitch.heatmap_shape((3000, 2000), 7.3)) == (274, 411)
    np.testing.assert_array_equal(np.isnan(ref), np.isnan(got))
    np.testing.assert_allclose(got, ref, atol=1e-5, equal_nan=True)
    np.testing.assert_allclose(got_cov, ref_cov, atol=1e-6)


def test_smoothing_keeps_a_constant_field_and_masks_outside_tissue() -> None:
    ys, xs = np.mgrid[0:2000:100, 0:3000:100]
    coords = np.column_stack([xs.ravel(), ys.ravel()])
    mask = np.zeros((20, 30), bool)
    mask[3:15, 5:25] = True  # tissue at mask downsample 100
    kw = dict(
        patch_l0=200,
        slide_wh=(3000, 2000),
        downsample=10,
        tissue_mask=mask,
        mask_downsample=100,
        mpp=0.5,
    )
    values, _ = stitch.stitch_scores(coords, np.full(len(coords), 0.7), sigma_um=60.0, **kw)
    inside = np.kron(mask, np.ones((10, 10), bool))
    assert np.isfinite(values[inside]).all()
    np.testing.assert_allclose(values[inside], 0.7, atol=1e-5)
    assert np.isnan(values[~inside]).all()
    # a step is blurred, but never darkened at the tissue edge (normalised convolution)
    step = np.where(coords[:, 0] < 1500, 0.0, 1.0)
    sm, _ = stitch.stitch_scores(coords, step, sigma_um=60.0, **kw)
    raw, _ = stitch.stitch_scores(coords, step, **kw)
    assert np.nanmin(sm) >= 0 and np.nanmax(sm) <= 1
    np.testing.assert_allclose(sm[inside][raw[inside] == 1.0].max(), 1.0, atol=1e-3)
    assert 0 < np.nanmean(np.abs(sm - raw)) < 0.1


def test_stitch_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="3 rows but scores has 2"):
        stitch.stitch_scores(
            np.zeros((3, 2)), np.zeros(2), patch_l0=4, slide_wh=(8, 8), downsample=1
        )
    with pytest.raises(ConfigError, match="needs the slide's mpp"):
        stitch.stitch_scores(
            np.zeros((1, 2)), np.zeros(1), patch_l0=4, slide_wh=(8, 8), downsample=1, sigma_um=5.0
        )
    with pytest.raises(ConfigError, match="must be positive"):
        stitch.stitch_scores(
            np.zeros((1, 2)), np.zeros(1), patch_l0=4, slide_wh=(8, 8), downsample=0
        )


def test_a_100k_by_60k_slide_needs_no_level0_array() -> None:
    """Stitching a 6-gigapixel slide allocates only the small grid and block buffers."""
    import tracemalloc

    rng = np.random.default_rng(2)
    coords = rng.integers(0, 100_000, size=(20_000, 2)) * [1, 0.6]
    tracemalloc.start()
    try:
        values, _ = stitch.stitch_scores(
            coords.astype(np.int64),
            rng.random(20_000),
            patch_l0=512,
            slide_wh=(100_000, 60_000),
            downsample=32,
            sigma_um=50,
            mpp=0.25,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert values.shape == (1875, 3125)
    assert peak < 200 * 2**20, peak / 2**20  # a level-0 float32 map would be 24 GB


# ------------------------------------------------------------------------------------ values
def test_percentile_ranks() -> None:
    np.testing.assert_allclose(
        stitch.percentile_ranks(np.array([0.1, 0.5, 0.3, 0.3])), [0, 100, 50, 50]
    )
    r = stitch.percentile_ranks(np.array([np.nan, 2.0, 1.0]))
    assert np.isnan(r[0]) and list(r[1:]) == [100.0, 0.0]
    assert list(stitch.percentile_ranks(np.array([0.2]))) == [100.0]
    assert stitch.percentile_ranks(np.zeros(0)).shape == (0,)
    np.testing.assert_array_equal(
        stitch.display_values(np.array([0.2, 0.9]), mode="probability"), np.float32([0.2, 0.9])
    )
    with pytest.raises(ConfigError, match="mode must be one of"):
        stitch.display_values(np.zeros(2), mode="rank")


def test_nan_scores_are_left_out_and_block_size_does_not_matter_then() -> None:
    coords = np.array([[0, 0], [2, 0], [4, 0]])
    values, coverage = stitch.stitch_scores(
        coords, np.array([0.2, np.nan, 0.6]), patch_l0=2, slide_wh=(6, 2), downsample=1
    )
    np.testing.assert_allclose(values[0], [0.2, 0.2, np.nan, np.nan, 0.6, 0.6], atol=1e-6)
    np.testing.assert_allclose(coverage[0], [1, 1, 0, 0, 1, 1], atol=1e-6)
    again, _ = stitch.stitch_scores(
        coords, np.array([0.2, np.nan, 0.6]), patch_l0=2, slide_wh=(6, 2), downsample=1, block_px=1
    )
    np.testing.assert_array_equal(np.isnan(values), np.isnan(again))


@pytest.mark.parametrize("combine", stitch.COMBINE)
def test_values_stay_in_the_scores_range(combine: str) -> None:
    rng = np.random.default_rng(5)
    coords = rng.integers(0, 900, size=(300, 2))
    scores = rng.uniform(0.3, 0.4, 300)
    values, _ = stitch.stitch_scores(
        coords,
        scores,
        patch_l0=100,
        slide_wh=(1000, 1000),
        downsample=3,
        sigma_um=20,
        mpp=1.0,
        combine=combine,
    )
    assert np.nanmin(values) >= np.float32(scores.min())
    assert np.nanmax(values) <= np.float32(scores.max())


def test_heatmap_shape_rounds_up() -> None:
    assert stitch.heatmap_shape((100, 50), 10) == (5, 10)
    assert stitch.heatmap_shape((101, 50), 10) == (5, 11)
    assert stitch.heatmap_shape((1, 1), 64) == (1, 1)


def test_stitch_rejects_a_negative_sigma_and_a_zero_block() -> None:
    kw = dict(patch_l0=4, slide_wh=(8, 8), downsample=1)
    with pytest.raises(ConfigError, match="sigma_um must be >= 0"):
        stitch.stitch_scores(np.zeros((1, 2)), np.zeros(1), sigma_um=-1.0, **kw)
    with pytest.raises(ConfigError, match=r"block_px \(0\) must be positive"):
        stitch.stitch_scores(np.zeros((1, 2)), np.zeros(1), block_px=0, **kw)


def test_display_values_in_percentile_mode_are_ranks() -> None:
    got = stitch.display_values(np.array([0.9, 0.1, 0.5]), mode="percentile")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [100, 0, 50])
    assert stitch.MODES == {"probability": (0.0, 1.0), "percentile": (0.0, 100.0)}

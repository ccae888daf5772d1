"""The notebook figures: tiling QC, patch galleries and heatmap overlays, drawn from a real
(small) tiled store with the Agg backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest

from wsi_pipeline import synth, viz
from wsi_pipeline.errors import ConfigError, StoreError
from wsi_pipeline.exports import colour_lut
from wsi_pipeline.heatmap import overlay_colours, stitch_store
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.stitch import display_values
from wsi_pipeline.store import SlideStore, open_store, write_scores
from wsi_pipeline.tile_batch import tile_slide

matplotlib.use("Agg")
RUN = "viz"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A small tiled slide with scores (and attention) for run ``viz``."""
    root = tmp_path_factory.mktemp("viz")
    slide = synth.write_slide(
        root / "small.svs", width=1536, height=1024, mpp=0.5, seed=4, tissue_fraction=0.4
    )
    tile_slide(slide.path, root / "stores", spec=TilingSpec(tile_px=128, mpp=0.5))
    path = root / "stores" / "small.zarr"
    st = SlideStore(path)
    scores = np.random.default_rng(0).random(st.n_patches).astype(np.float32)
    g = open_store(path, mode="r+")
    write_scores(g, RUN, scores, {"predicted": "tumour", "abnormal_probability": 0.75})
    write_scores(g, RUN, scores / scores.sum(), {}, attention=True)
    return {"path": path, "scores": scores}


@pytest.fixture(autouse=True)
def _close_figures() -> Any:
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_plot_tiling_draws_a_box_per_patch(store: dict[str, Any]) -> None:
    from matplotlib.collections import PolyCollection

    st = SlideStore(store["path"])
    assert st.n_patches >= 8
    fig = viz.plot_tiling(store["path"])
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == st.thumbnail.shape
    boxes = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(boxes) == 1 and len(boxes[0].get_paths()) == st.n_patches
    assert ax.get_title().startswith(f"small: {st.n_patches} patches of 128 px at 0.5 µm/px")
    few = viz.plot_tiling(st, max_boxes=5)  # an open store works too
    boxes = [c for c in few.axes[0].collections if isinstance(c, PolyCollection)]
    assert len(boxes[0].get_paths()) == 5


def test_plot_patches_random_and_top_scores(store: dict[str, Any]) -> None:
    st = SlideStore(store["path"])
    fig = viz.plot_patches(st, n=4, seed=1)
    assert len(fig.axes) == 4
    assert all(ax.images[0].get_array().shape == (128, 128, 3) for ax in fig.axes)
    again = viz.plot_patches(st, n=4, seed=1)
    assert [a.get_title() for a in fig.axes] == [a.get_title() for a in again.axes]
    top = viz.plot_patches(st, n=3, by="score", run_id=RUN)
    best = np.argsort(-store["scores"], kind="stable")[:3]
    assert [a.get_title() for a in top.axes] == [f"#{i} {store['scores'][i]:.3g}" for i in best]
    assert top._suptitle.get_text() == "small: score patches"
    chosen = viz.plot_patches(st, indices=[2, 0])
    assert [a.get_title() for a in chosen.axes] == ["#2", "#0"]
    np.testing.assert_array_equal(chosen.axes[0].images[0].get_array(), st.reader().read([2])[0])


def test_plot_patches_errors(store: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="run_id is needed"):
        viz.plot_patches(store["path"], by="score")
    with pytest.raises(ValueError, match="by must be 'random', 'score' or 'attention'"):
        viz.plot_patches(store["path"], by="best")
    with pytest.raises(StoreError, match=r"no 'scores/other-attention'.*predict --run other"):
        viz.plot_patches(store["path"], by="attention", run_id="other")


@pytest.mark.parametrize(
    ("which", "mode", "vmax"),
    [("score", None, 1.0), ("score", "percentile", 100.0), ("attention", None, 100.0)],
)
def test_plot_heatmap_shows_the_stitched_scores(
    store: dict[str, Any], which: str, mode: str | None, vmax: float
) -> None:
    st = SlideStore(store["path"])
    fig = viz.plot_heatmap(st, run_id=RUN, which=which, mode=mode)
    ax, bar = fig.axes
    thumb, heat = ax.images
    assert thumb.get_array().shape == st.thumbnail.shape
    scores = store["scores"] if which == "score" else store["scores"] / store["scores"].sum()
    shown = display_values(
        scores, mode=mode or ("probability" if which == "score" else "percentile")
    )
    ref, _ = stitch_store(st, shown)
    got = heat.get_array()
    np.testing.assert_array_equal(got.mask, np.isnan(ref))
    np.testing.assert_allclose(got.filled(np.nan), ref, rtol=1e-6, equal_nan=True)
    assert heat.get_clim() == (0.0, vmax)
    # the colours and opacities of the exported PNG and TIFF: viridis, low values transparent
    lut, low = overlay_colours(mode or ("probability" if which == "score" else "percentile"))
    np.testing.assert_allclose(heat.get_cmap()(np.arange(256)), lut / 255.0)
    drawn = heat.to_rgba(got, bytes=True)
    assert (drawn[got.filled(np.nan) <= low, 3] == 0).all()
    assert (drawn[got.mask, 3] == 0).all()
    assert lut[-1, :3].tolist() == colour_lut("viridis")[-1].tolist()
    assert f"{which} (" in ax.get_title() and "predicted tumour" in ax.get_title()
    assert "p(abnormal) = 0.75" in ax.get_title()
    assert bar.get_ylabel() in ("abnormality probability", "within-slide percentile")


def test_plot_heatmap_colours_on_request(store: dict[str, Any]) -> None:
    fig = viz.plot_heatmap(store["path"], run_id=RUN, cmap="jet", alpha=1.0, transparent_below=0.5)
    heat = fig.axes[0].images[1]
    lut, _ = overlay_colours("probability", cmap="jet", alpha=1.0, transparent_below=0.5)
    np.testing.assert_allclose(heat.get_cmap()(np.arange(256)), lut / 255.0)
    assert heat.get_cmap()(255)[3] == 1.0 and heat.get_cmap()(127)[3] == 0.0


def test_plot_heatmap_errors(store: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not probabilities"):
        viz.plot_heatmap(store["path"], run_id=RUN, which="attention", mode="probability")
    with pytest.raises(StoreError, match=r"no 'scores/nope' in the store \(it has: viz\)"):
        viz.plot_heatmap(store["path"], run_id="nope")
    with pytest.raises(StoreError, match="run 'wsi-pipeline tile' first"):
        viz.plot_heatmap(tmp_path, run_id=RUN)

"""The frozen-backbone feature cache (wsi_pipeline.features), on real tiled stores."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsi_pipeline import features, runs
from wsi_pipeline.features import (
    FEATURES_DTYPE,
    embed_store,
    ensure_features,
    feature_stats,
    state_dict_digest,
)
from wsi_pipeline.models import get_backbone
from wsi_pipeline.store import SlideStore, features_key

CPU = torch.device("cpu")


@pytest.fixture
def stores(small_cohort: tuple[Path, Path], tmp_path: Path) -> list[Path]:
    """Two real tiled stores (copies: the cache writes into them)."""
    small, _ = small_cohort
    out = []
    for p in sorted(small.glob("*.zarr"))[:2]:
        shutil.copytree(p, tmp_path / p.name)
        out.append(tmp_path / p.name)
    return out


def test_ensure_features_computes_once(
    stores: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = features.embed_store

    def counting(store, net, **kw):
        calls.append(Path(store).name)
        return real(store, net, **kw)

    monkeypatch.setattr(features, "embed_store", counting)
    run = tmp_path / "run"
    run.mkdir()
    name, dim = ensure_features(
        stores, backbone="smallcnn", weights=None, device=CPU, seed=3, run_dir=run, progress=False
    )
    assert dim == 128 and name.startswith("smallcnn-") and len(name) == len("smallcnn-") + 12
    assert calls == [p.name for p in stores]
    for p in stores:
        arr = zarr.open_group(str(p), mode="r")[features_key(name)]
        assert arr.attrs["complete"] is True and arr.dtype == np.dtype(FEATURES_DTYPE)
        assert arr.shape == (SlideStore(p).n_patches, dim)
        assert arr.attrs["weights_sha256"].startswith(name.split("-")[1])
    # the saved extractor reproduces the name: predict finds the same features again
    saved = torch.load(run / runs.EXTRACTOR, weights_only=True)
    assert state_dict_digest(saved)[:12] == name.split("-")[1]
    again, _ = ensure_features(
        stores, backbone="smallcnn", weights=run / runs.EXTRACTOR, device=CPU, progress=False
    )
    assert again == name and calls == [p.name for p in stores]  # nothing embedded twice
    # another seed: other weights, other features, computed again
    other, _ = ensure_features(
        stores[:1], backbone="smallcnn", weights=None, device=CPU, seed=4, progress=False
    )
    assert other != name and len(calls) == 3


def test_embed_store_and_stats(stores: list[Path]) -> None:
    net, dim = get_backbone("smallcnn")
    net.eval()
    h = embed_store(stores[0], net, device=CPU, batch_size=16)
    assert h.shape == (SlideStore(stores[0]).n_patches, dim) and h.dtype == np.float32
    name, _ = ensure_features(stores, backbone="smallcnn", weights=None, device=CPU, progress=False)
    mean, std = feature_stats(stores, name)
    f = np.concatenate(
        [
            np.asarray(zarr.open_group(str(p), mode="r")[features_key(name)][...], np.float64)
            for p in stores
        ]
    )
    np.testing.assert_allclose(mean.numpy(), f.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.numpy(), f.std(0), rtol=1e-4, atol=1e-5)


def test_state_dict_digest_ignores_order() -> None:
    a = {"w": torch.ones(2), "b": torch.zeros(1)}
    b = {"b": torch.zeros(1), "w": torch.ones(2)}
    assert state_dict_digest(a) == state_dict_digest(b)
    assert state_dict_digest(a) != state_dict_digest({"w": torch.ones(2), "b": torch.ones(1)})

"""The frozen-backbone feature cache (wsi_pipeline.features), on real tiled stores."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from wsi_pipeline import features, runs
from wsi_pipeline.errors import ConfigError, StoreError
from wsi_pipeline.features import (
    FEATURES_DTYPE,
    compute_features,
    embed_store,
    ensure_features,
    export_features,
    feature_stats,
    find_stores,
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


def test_state_dict_digest_of_half_precision_weights() -> None:
    a = {"w": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(2.0, dtype=torch.float16)}
    b = {"w": torch.ones(3, dtype=torch.bfloat16), "s": torch.tensor(3.0, dtype=torch.float16)}
    assert state_dict_digest(a) != state_dict_digest(b)
    # float32 bytes as before: digests of existing caches stay valid
    f32 = {"w": torch.arange(4, dtype=torch.float32)}
    h = hashlib.sha256(b"w" + np.arange(4, dtype=np.float32).tobytes()).hexdigest()
    assert state_dict_digest(f32) == h


def test_ensure_features_without_weights_is_a_labelled_random_init(
    stores: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        name, _ = ensure_features(
            stores[:1], backbone="smallcnn", weights=None, device=CPU, progress=False
        )
    assert "features from a randomly initialised backbone" in caplog.text
    arr = zarr.open_group(str(stores[0]), mode="r")[features_key(name)]
    assert arr.attrs["weights"] == "random-init"
    # asked for explicitly: the same seeded weights, the same features
    again, _ = ensure_features(
        stores[:1], backbone="smallcnn", weights="none", device=CPU, progress=False
    )
    assert again == name


def test_embed_store_resizes_and_normalises_like_the_encoder(stores: list[Path]) -> None:
    seen: list[tuple[int, ...]] = []

    def net(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[1:]))
        return x.mean(dim=(2, 3))

    n = SlideStore(stores[0]).n_patches
    h = embed_store(stores[0], net, device=CPU, batch_size=5, mean=(0, 0, 0), std=(1, 1, 1))
    assert h.shape == (n, 3) and seen[0] == (3, 64, 64)
    patches = SlideStore(stores[0]).reader().read(np.arange(n)).astype(np.float64) / 255
    np.testing.assert_allclose(h, patches.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    seen.clear()
    h2 = embed_store(
        stores[0],
        net,
        device=CPU,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        input_px=32,
        interpolation="bicubic",
    )
    assert seen[0] == (3, 32, 32) and h2.shape == (n, 3)
    np.testing.assert_allclose(h2, h, atol=0.02)  # an antialiased resize keeps the mean


def test_compute_features_goes_store_by_store(stores: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere: no such store or folder of stores"):
        find_stores([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no stores \(\*\.zarr\) in .*empty$"):
        find_stores([tmp_path / "empty"])
    assert find_stores([stores[0].parent, stores[0]]) == sorted(stores[0].parent.glob("*.zarr"))
    rep = compute_features(
        stores, backbone="smallcnn", weights="none", device="cpu", progress=False
    )
    assert [r.status for r in rep.results] == ["computed", "computed"] and rep.dim == 128
    assert rep.weights == "random-init" and all(r.n_patches > 0 for r in rep.results)
    rep2 = compute_features(
        stores, backbone="smallcnn", weights="none", device="cpu", overwrite=True, progress=False
    )
    assert rep2.name == rep.name and rep2.counts() == {"computed": 2}
    rep3 = compute_features(
        stores, backbone="smallcnn", weights="none", device="cpu", progress=False
    )
    assert rep3.counts() == {"skipped": 2}
    with pytest.raises(ConfigError, match=r"batch size must be >= 1, got 0"):
        compute_features(stores, backbone="smallcnn", weights="none", batch_size=0)


def test_features_take_the_store_lock(stores: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """``features`` writes a store under its lock (as tile and predict do): it waits for
    another writer, and a store still locked after the wait fails with one line while the
    other store is written; nothing is written into the locked store."""
    import threading

    from wsi_pipeline.locks import acquire
    from wsi_pipeline.store import has_complete_array, open_store

    kw = {"backbone": "smallcnn", "weights": "none", "device": "cpu", "progress": False}
    monkeypatch.setattr(features, "STAGE_WAIT_S", 0.3, raising=False)
    lock = acquire(stores[1])
    try:
        rep = compute_features(stores, **kw)
    finally:
        lock.release()
    assert [r.status for r in rep.results] == ["computed", "failed"]
    err = rep.results[1].error
    assert "locked by" in err and str(stores[1]) in err and "\n" not in err
    assert not has_complete_array(open_store(stores[1]), features_key(rep.name))

    monkeypatch.setattr(features, "STAGE_WAIT_S", 60.0, raising=False)
    lock = acquire(stores[1])
    threading.Timer(1.0, lock.release).start()  # the other writer ends while features waits
    rep = compute_features(stores, **kw)
    assert [r.status for r in rep.results] == ["skipped", "computed"]
    assert has_complete_array(open_store(stores[1]), features_key(rep.name))


def test_a_rerun_clears_what_a_killed_features_left_half_written(stores: list[Path]) -> None:
    """A writer killed between zarr-python's write of a key and its rename leaves
    ``<key>.<hex>.partial`` files in the store (``bench_faults.py`` found them after a killed
    predict). zarr never reads them; ``features`` writing the store, under its lock, removes
    them, and writes the same features as a store without them."""
    kw = {"backbone": "smallcnn", "weights": "none", "device": "cpu", "progress": False}
    rep = compute_features(stores[:1], **kw)
    key = features_key(rep.name)
    before = zarr.open_group(str(stores[0]), mode="r")[key][...]
    litter = [stores[0] / "zarr.964207fa6b344bb5a452cf743e88049d.partial"]
    litter.append(stores[0] / "features" / "zarr.1456db2cf1a5410e80b9e8d46b3cb4ef.partial")
    for f in litter:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b'{"zarr_format": 3, "node_type": "gr')  # cut short
    again = compute_features(stores[:1], overwrite=True, **kw)
    assert again.counts() == {"computed": 1}
    assert not [f for f in stores[0].rglob("*.partial")]
    np.testing.assert_array_equal(zarr.open_group(str(stores[0]), mode="r")[key][...], before)


def test_export_needs_complete_features(stores: list[Path], tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match=r"no complete 'features/nope'; run 'wsi-pipeline features'"
    ):
        export_features(stores[0], "nope", tmp_path)


def test_features_on_a_dask_scheduler_equal_the_serial_ones(
    small_cohort: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``features --scheduler``: two worker processes of a real dask cluster embed the stores
    (one task per store, the encoder loaded once per worker), the features equal those of one
    process, and a broken store fails on its own line while the others are written."""
    from distributed import LocalCluster

    from wsi_pipeline.cli import main

    small, _ = small_cohort
    serial, spread = tmp_path / "serial", tmp_path / "spread"
    for d in (serial, spread):
        for p in sorted(small.glob("*.zarr"))[:4]:
            shutil.copytree(p, d / p.name)
    (spread / "broken.zarr").mkdir()
    (spread / "broken.zarr" / "zarr.json").write_text("{not json")
    rep = compute_features([serial], backbone="smallcnn", weights="none", progress=False)
    args = ["features", str(spread), "--backbone", "smallcnn", "--weights", "none", "-q"]
    environ = dict(os.environ)
    try:
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster:
            assert main([*args, "--scheduler", cluster.scheduler_address]) == 1
    finally:  # distributed leaves OMP_NUM_THREADS=1 (its pre-spawn environ) in this process
        os.environ.clear()
        os.environ.update(environ)
    captured = capsys.readouterr()
    errors = [x for x in captured.err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "broken.zarr" in errors[0], captured.err
    assert "4 computed, 1 failed" in captured.out
    key = features_key(rep.name)
    for p in sorted(serial.glob("*.zarr")):
        want = zarr.open_group(p, mode="r")[key][...]
        got = zarr.open_group(spread / p.name, mode="r")[key][...]
        np.testing.assert_array_equal(got, want, err_msg=p.name)


def test_a_weights_file_written_again_is_loaded_again(stores: list[Path], tmp_path: Path) -> None:
    """The encoder is loaded once per process and kept for the next call, but a weights file
    written again at the same path (pretraining again, in a notebook) is loaded again: its
    features get the new weights' name, never the old encoder's."""
    path = tmp_path / "w.pt"
    names = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net, _ = get_backbone("smallcnn")
        torch.save(net.state_dict(), path)
        rep = compute_features(stores[:1], backbone="smallcnn", weights=path, progress=False)
        assert rep.counts() == {"computed": 1}
        names.append(rep.name)
    assert names[0] != names[1]

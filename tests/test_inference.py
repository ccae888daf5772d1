"""Running a model (wsi_pipeline.inference): device, model from a run, weights, bag inference."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from helpers import FAST

from wsi_pipeline import runs
from wsi_pipeline.data import BagDataset
from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.inference import (
    autocast,
    bag_output,
    build_model,
    load_model,
    load_weights,
    resolve_device,
    store_embeddings,
    to_device,
)
from wsi_pipeline.specs import TrainConfig
from wsi_pipeline.store import SlideStore

CPU = torch.device("cpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == CPU
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device is available"):
            resolve_device("cuda")


def test_build_model_follows_the_config() -> None:
    e2e = build_model(TrainConfig(hidden_dim=32, attn_dim=16), 3)
    assert e2e.backbone is not None and e2e.head.num_classes == 3
    head = build_model(TrainConfig(mode="features", model="meanmil"), 2, in_dim=24)
    assert head.backbone is None and head.in_dim == 24
    out = head(torch.randn(5, 24))
    assert out.logits.shape == (2,) and out.patch_logits.shape == (5, 2)


def test_load_model_and_weights(fast_run: Path, tmp_path: Path) -> None:
    model = load_model(runs.load_run(fast_run), device=CPU)
    assert not model.training
    saved = torch.load(fast_run / runs.MODEL, weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    other = build_model(TrainConfig(**FAST), 2)
    assert load_weights(other, fast_run / runs.MODEL) is other
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match=r"bad\.pt: cannot load weights"):
        load_weights(other, tmp_path / "bad.pt")
    wrong = build_model(TrainConfig(hidden_dim=16), 2)
    with pytest.raises(TrainingError, match=r"cannot load weights .*size mismatch"):
        load_weights(wrong, fast_run / runs.MODEL)


def test_autocast_and_to_device() -> None:
    assert isinstance(autocast(CPU, True), contextlib.nullcontext)
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    y = to_device(x, CPU, True)
    assert y.device == CPU and y.is_contiguous()  # channels-last only on CUDA
    if torch.cuda.is_available():
        g = to_device(x, torch.device("cuda"), True)
        assert g.is_contiguous(memory_format=torch.channels_last)


def test_bag_output_in_chunks_matches_one_pass(
    fast_run: Path, small_cohort: tuple[Path, Path]
) -> None:
    stores, _ = small_cohort
    model = load_model(runs.load_run(fast_run), device=CPU)
    x = BagDataset(sorted(stores.glob("*.zarr"))[:1], [0])[0][0]
    chunked = bag_output(model, x, device=CPU, amp=False, channels_last=False, chunk=7)
    with torch.inference_mode():
        whole = model(x)
    torch.testing.assert_close(chunked.logits, whole.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.attention, whole.attention, rtol=1e-5, atol=1e-6)
    assert chunked.patch_logits.shape == (len(x), 2)


def test_store_embeddings(fast_run: Path, small_cohort: tuple[Path, Path]) -> None:
    stores, _ = small_cohort
    model = load_model(runs.load_run(fast_run), device=CPU)
    path = sorted(stores.glob("*.zarr"))[0]
    h = store_embeddings(path, model.embed, device=CPU, chunk=10, out_device="cpu")
    n = SlideStore(path).n_patches
    assert h.shape == (n, model.in_dim) and h.dtype == torch.float32
    x = BagDataset([path], [0])[0][0]
    with torch.inference_mode():
        torch.testing.assert_close(h, model.embed(x), rtol=1e-5, atol=1e-5)

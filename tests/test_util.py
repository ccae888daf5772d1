"""util: safe ids, atomic writes (no half-written file, ever), strict JSON, RGB resize."""

from __future__ import annotations

import io
import json
import math
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from wsi_pipeline.errors import ConfigError
from wsi_pipeline.util import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    json_ready,
    output_dir,
    resize_rgb,
    rows_whole,
    sample_mask,
    sanitize_id,
    save_torch,
    torchscript_quiet,
)


@pytest.mark.parametrize(
    ("name", "safe"),
    [
        ("../x", "_x"),
        ("", "slide"),
        ("..", "slide"),
        (".", "slide"),
        ("a/b\\c d", "a_b_c_d"),
        ("TCGA-01.svs", "TCGA-01.svs"),
        (".hidden", "hidden"),
    ],
)
def test_sanitize_id(name: str, safe: str) -> None:
    assert sanitize_id(name) == safe
    assert "/" not in safe and safe not in ("", ".", "..")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the end
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []
    missing = tmp_path / "none.txt"
    with pytest.raises(ValueError), atomic_path(missing) as tmp:
        tmp.write_text("x")
        raise ValueError
    assert not missing.exists() and _leftovers(tmp_path) == []


def test_atomic_writers(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "b", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "t", "µm").read_text(encoding="utf-8") == "µm"
    assert _leftovers(tmp_path) == []


def test_save_torch_gives_the_same_bytes_for_the_same_weights(tmp_path: Path) -> None:
    """Saved by two writers (other temporary names), the same weights are the same bytes, so
    ``runs.model_id`` names the model and not the write (a rerun after a kill is the same
    model); loadable with ``weights_only``."""
    import threading

    import torch

    from wsi_pipeline.runs import model_id

    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_torch(state, tmp_path / "a" / "model.pt")
    t = threading.Thread(target=save_torch, args=(state, tmp_path / "b" / "model.pt"))
    t.start()
    t.join()
    a, b = (tmp_path / d / "model.pt" for d in "ab")
    assert a.read_bytes() == b.read_bytes()
    assert model_id(tmp_path / "a") == model_id(tmp_path / "b")
    assert torch.equal(torch.load(b, weights_only=True)["w"], state["w"])
    assert _leftovers(tmp_path / "a") == [] and _leftovers(tmp_path / "b") == []


def test_atomic_write_json_is_strict(tmp_path: Path) -> None:
    obj = {
        "auc": float("nan"),
        "inf": -math.inf,
        "n": np.int64(3),
        "x": np.float32(0.5),
        "arr": np.array([1.0, np.nan]),
        "path": tmp_path / "a",
        "t": (1, 2),
        1: "key",
    }
    path = atomic_write_json(tmp_path / "m.json", obj)
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text

    def refuse(name: str) -> None:
        raise AssertionError(name)

    data = json.loads(text, parse_constant=refuse)
    assert data == {
        "auc": None,
        "inf": None,
        "n": 3,
        "x": 0.5,
        "arr": [1.0, None],
        "path": str(tmp_path / "a"),
        "t": [1, 2],
        "1": "key",
    }
    assert json_ready({"a": [np.bool_(True)]}) == {"a": [True]}


def test_resize_rgb_size_is_width_height() -> None:
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 200
    out = resize_rgb(img, (30, 20))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    assert out[:, :14].max() == 0 and out[:, 16:].min() == 200  # exact 2x box average
    assert resize_rgb(img, (60, 40)) is img
    odd = resize_rgb(img, (25, 17), resample="area")
    assert odd.shape == (17, 25, 3)


def test_resize_rgb_halving_is_pillows_reduce() -> None:
    """Halving runs through OpenCV's area resize: the same pixels as Pillow's 2x2 reduce
    (rounding included), on odd values and sizes."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for h, w in ((2, 2), (38, 62), (1876, 2502)):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = resize_rgb(img, (w // 2, h // 2), resample="area")
        np.testing.assert_array_equal(out, np.asarray(Image.fromarray(img).reduce(2)))


def test_resize_rgb_linear_takes_the_exact_box() -> None:
    """The bilinear warp puts output pixels where Pillow's bilinear resize of the same
    fractional box does (OpenCV's pixel centres are on integers, Pillow's on halves): a box a
    third of a pixel off is a different image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((120, 120), Image.Resampling.BICUBIC))
    box = (3.37, 5.81, 3.37 + 100.6, 5.81 + 101.4)  # enlarged ~1 %, as a 0.2527 µm/px scan
    out = resize_rgb(img, (102, 100), resample="linear", src_box=box)
    assert out.shape == (100, 102, 3) and out.dtype == np.uint8
    ref = np.asarray(Image.fromarray(img).resize((102, 100), Image.Resampling.BILINEAR, box=box))
    mad = np.abs(out.astype(int) - ref).mean()
    assert mad < 0.5  # measured 0.29: rounding of the two fixed-point implementations
    off = (box[0] + 0.33, box[1], box[2] + 0.33, box[3])
    moved = np.asarray(Image.fromarray(img).resize((102, 100), Image.Resampling.BILINEAR, box=off))
    assert np.abs(out.astype(int) - moved).mean() > 3 * mad
    # rows of a wider image (a view, as from a band of tiles) warp where they lie, the same
    wide = np.zeros((120, 200, 3), np.uint8)
    wide[:, 37:157] = img
    view = wide[:, 37:157]
    assert not view.flags.c_contiguous
    import cv2

    threads = cv2.getNumThreads()
    try:
        for n in (1, 2):  # warped where it lies (one OpenCV thread), or copied first
            cv2.setNumThreads(n)
            got = resize_rgb(view, (102, 100), resample="linear", src_box=box)
            np.testing.assert_array_equal(got, out)
    finally:
        cv2.setNumThreads(threads)


def test_resize_rgb_linear_on_the_pixel_grid_is_the_box_itself() -> None:
    """A box on the pixel grid at the output's size (a 0.25 µm/px scan decoded at 1/2 for
    0.5 µm/px) is not warped: its pixels come back as they are, the same as the warp's and as
    Pillow's bilinear resize of the box; a box a fraction of a pixel off is still warped."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    box = (7, 3, 7 + 64, 3 + 64)
    out = resize_rgb(img, (64, 64), resample="linear", src_box=box)
    np.testing.assert_array_equal(out, img[3:67, 7:71])
    assert np.shares_memory(out, img)  # not warped: a view of the box
    pil = Image.fromarray(img).resize((64, 64), Image.Resampling.BILINEAR, box=box)
    np.testing.assert_array_equal(out, np.asarray(pil))
    m = np.array([[1.0, 0, 7], [0, 1.0, 3]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    np.testing.assert_array_equal(out, cv2.warpAffine(img, m, (64, 64), flags=flags))
    off = (7.25, 3, 7.25 + 64, 3 + 64)
    moved = resize_rgb(img, (64, 64), resample="linear", src_box=off)
    assert np.abs(moved.astype(int) - out).mean() > 5
    # a box reaching past the image's edge is warped (edges replicated), not cut short
    edge = resize_rgb(img, (64, 64), resample="linear", src_box=(30, 3, 94, 67))
    np.testing.assert_array_equal(edge[:, :60], img[3:67, 30:90])
    np.testing.assert_array_equal(edge[:, 60:], np.repeat(img[3:67, -1:], 4, axis=1))


def test_rows_whole_tells_a_box_of_an_image_from_a_strided_one() -> None:
    """A box of a larger image (whole pixels, rows one stride apart) is passed to OpenCV and
    libjpeg-turbo as it is; a view that skips pixels or channels, or runs down the columns, is
    made contiguous first -- and either way the warp and the encode see the same pixels."""
    from wsi_pipeline.codecs import encode_chunk

    img = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    assert rows_whole(img) and rows_whole(img[3:20, 5:30]) and rows_whole(img[:, :, 0].copy())
    assert rows_whole(img[3:20, 5:30, 0].copy()) and rows_whole(img[::2])  # rows apart: fine
    for odd in (img[:, ::2], img[:, :, :2], img[:, :, ::-1], img.transpose(1, 0, 2), img[..., 0]):
        assert not rows_whole(odd)
    for view in (img[3:35, 5:37], img[3:35, 5:37, ::-1], img[5:37, 3:35].transpose(1, 0, 2)):
        box = (0.5, 0.25, 30.5, 30.25)
        np.testing.assert_array_equal(
            resize_rgb(view, (30, 30), resample="linear", src_box=box),
            resize_rgb(view.copy(), (30, 30), resample="linear", src_box=box),
        )
        assert encode_chunk(view, "jpeg") == encode_chunk(view.copy(), "jpeg")


def test_sample_mask_maps_through_level0() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5, :5] = True  # mask pixels are 4 level-0 px: the top-left 20 x 20 level-0 px
    # output pixels are 8 level-0 px; their centres (4, 12, 20, ...) fall on mask pixels 1, 3, 5
    out = sample_mask(mask, 4.0, 8.0, (0, 5), (0, 5))
    expect = np.zeros((5, 5), bool)
    expect[:2, :2] = True
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expect)
    np.testing.assert_array_equal(sample_mask(mask, 4.0, 8.0, (1, 3), (0, 3)), expect[1:3, :3])
    assert sample_mask(mask, 4.0, 400.0, (0, 3), (0, 3)).shape == (3, 3)  # clipped to the mask


def test_output_dir_creates_probes_and_refuses_in_one_line(tmp_path: Path) -> None:
    out = output_dir(tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b" and out.is_dir()
    assert list(out.iterdir()) == []  # its probe file is gone
    assert output_dir(out) == out  # an existing folder is fine
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"output folder cannot be written") as err:
        output_dir(blocker / "sub")
    assert str(blocker / "sub") in str(err.value) and "\n" not in str(err.value)
    assert blocker.read_text() == "x"  # nothing written over the file


@pytest.mark.parametrize("command", ["synth", "train", "predict", "evaluate", "tile"])
def test_every_command_refuses_an_output_under_a_file(
    command: str, tmp_path: Path, small_cohort: tuple[Path, Path], fast_run: Path, capsys
) -> None:
    """Bad usage, one line, exit 2 -- never a NotADirectoryError traceback."""
    from wsi_pipeline.cli import main

    stores, labels = small_cohort
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = str(blocker / "sub")
    args = {
        "synth": ["synth", out, "--n-slides", "2", "--width", "512", "--height", "512"],
        "train": ["train", str(stores), "--labels", str(labels), "--out", out, "--epochs", "1"],
        "predict": ["predict", str(stores), "--run", str(fast_run), "--out", out],
        "evaluate": [
            "evaluate",
            str(stores),
            "--run",
            str(fast_run),
            "--labels",
            str(labels),
            "--out",
            out,
        ],
        "tile": ["tile", str(next((labels.parent / "slides").iterdir())), "--out", out],
    }[command]
    assert main([*args, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "output folder cannot be written" in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert blocker.read_text() == "x"


def test_a_rerun_removes_the_temporary_file_of_a_killed_writer(tmp_path: Path) -> None:
    """A writer killed with SIGKILL inside ``atomic_path`` leaves its temporary file; the next
    write of the same file removes it, and leaves a live process's temporary file alone."""
    import signal
    import subprocess
    import sys

    from wsi_pipeline.util import atomic_write_text

    target = tmp_path / "slide.svs"
    code = (
        "import sys, time\n"
        "from wsi_pipeline.util import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half')\n"
        "    print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    killed = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
    alive = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE)
    try:
        assert killed.stdout.readline() == b"writing\n" and alive.stdout.readline() == b"writing\n"
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        left = sorted(p.name for p in tmp_path.glob(".slide.svs.*.tmp"))
        assert len(left) == 2 and f".slide.svs.{killed.pid}." in left[0] + left[1]
        atomic_write_text(target, "whole")
        assert target.read_text() == "whole"
        after = [p.name for p in tmp_path.glob(".slide.svs.*.tmp")]
        assert len(after) == 1 and f".slide.svs.{alive.pid}." in after[0]
    finally:
        for proc in (killed, alive):
            proc.kill()
            proc.wait(10)


def test_torchscript_quiet_hides_only_torchscripts_deprecation() -> None:
    import torch

    with torchscript_quiet():
        m = torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2), check_trace=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with torchscript_quiet():
            torch.jit.save(m, io.BytesIO())
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        torch.jit.save(m, io.BytesIO())  # outside: shown again
    messages = [str(w.message) for w in seen]
    assert messages[0] == "something else is deprecated"
    assert len(messages) == 2 and "torch.jit.save" in messages[1]


def test_torchscript_quiet_in_threads_leaves_the_filters_as_they_were() -> None:
    """Two overlapping blocks in two threads restored each other's filter lists (catch_warnings
    is process-wide): B entered inside A, A left, then B put back A's list, filter included."""
    before = list(warnings.filters)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def a() -> None:
        with torchscript_quiet():
            a_in.set()
            b_in.wait(0.5)  # B enters here unless the blocks exclude each other
        a_out.set()

    def b() -> None:
        a_in.wait(5)
        with torchscript_quiet():
            b_in.set()
            a_out.wait(5)  # leave after A

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings.filters == before

"""Evaluating a run on a labelled cohort (wsi_pipeline.evaluation, ``wsi-pipeline evaluate``)."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import copy_run, read_strict_json, tile_cohort_slide, write_labels

import wsi_pipeline as wp
from wsi_pipeline import evaluation
from wsi_pipeline.cli import main
from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.evaluation import evaluate, slide_metrics
from wsi_pipeline.plots import roc_figure
from wsi_pipeline.specs import TilingSpec
from wsi_pipeline.util import atomic_write_json

N_BOOT = 200  # enough for the plumbing, quick


def _table(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def _defined(metrics: dict) -> dict[str, dict]:
    """Every ``{"value", "ci95", "reason"}`` entry, per-class ones as ``class/metric``."""
    out = {k: v for k, v in metrics.items() if k != "per_class"}
    for cls, per in metrics.get("per_class", {}).items():
        out.update({f"{cls}/{k}": v for k, v in per.items() if k != "n"})
    return out


def _check_metrics(metrics: dict) -> None:
    """Values in range, each CI an ordered pair around its value, or null with a reason."""
    for name, m in _defined(metrics).items():
        assert set(m) == {"value", "ci95", "reason"}, name
        if m["value"] is None:
            assert m["ci95"] is None and m["reason"], name
            continue
        top = 2.0 if name == "brier" else 1.0
        assert 0.0 <= m["value"] <= top, (name, m)
        if m["ci95"] is None:
            assert m["reason"], name
            continue
        lo, hi = m["ci95"]
        assert 0.0 <= lo <= m["value"] <= hi <= top, (name, m)
        assert m["reason"] is None, name


@pytest.fixture
def stores_copy(small_cohort: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the small cohort's stores (evaluate writes scores into them)."""
    d = tmp_path / "stores"
    shutil.copytree(small_cohort[0], d)
    return d


# ---------------------------------------------------------------------------------------------
# the fast run on the small cohort
# ---------------------------------------------------------------------------------------------
def test_evaluate_writes_metrics_table_and_figures(
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    stores_copy: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, labels_csv = small_cohort
    out = tmp_path / "ev"
    with caplog.at_level(logging.WARNING, logger="wsi_pipeline"):
        res = wp.evaluate(stores_copy, fast_run, labels_csv, out, n_boot=N_BOOT, progress=False)
    assert wp.evaluate is evaluate
    for name in ("evaluation.json", "evaluation.csv", "roc.png", "reliability.png"):
        assert (out / name).is_file(), name
    assert (out / "roc.png").read_bytes().startswith(b"\x89PNG")
    saved = read_strict_json(out / evaluation.EVALUATION)
    assert saved == json.loads(json.dumps(res))  # what is returned is what is written
    assert res["n"] == res["n_labelled"] == 8 and res["failed"] == []
    assert res["classes"] == ["0", "1"] and res["negative_class"] == "0"
    assert sum(res["class_counts"].values()) == 8
    assert res["bootstrap"] == {"n_boot": N_BOOT, "level": 0.95, "seed": 0, "unit": "slide"}
    m = res["metrics"]
    assert set(m) == {
        "auc",
        "accuracy",
        "balanced_accuracy",
        "sensitivity",
        "specificity",
        "brier",
        "ece",
    }
    _check_metrics(m)
    assert m["auc"]["value"] is not None and m["auc"]["ci95"] is not None
    # the run trained on these slides: said in the file and in a warning
    assert sum(res["seen_by_run"].values()) == 8
    assert "not an external test set" in caplog.text
    # the per-slide table agrees with predict's predictions
    table = _table(out / evaluation.EVALUATION_TABLE)
    assert list(next(iter(table.values()))) == [
        "slide_id",
        "label",
        "p_0",
        "p_1",
        "predicted",
        "correct",
        "error",
    ]
    preds = _table(out / "predictions.csv")
    assert set(table) == set(preds) == {f"synth_{i:03d}" for i in range(8)}
    for sid, row in table.items():
        assert row["p_1"] == preds[sid]["p_1"] and row["predicted"] == preds[sid]["predicted_label"]
        assert row["correct"] == str(int(row["predicted"] == row["label"])) and row["error"] == ""
    acc = np.mean([r["correct"] == "1" for r in table.values()])
    assert m["accuracy"]["value"] == pytest.approx(acc)
    # sensitivity/specificity at the run's rule: abnormal probability >= 0.5
    pos = [r for r in table.values() if r["label"] == "1"]
    assert m["sensitivity"]["value"] == pytest.approx(
        np.mean([float(r["p_1"]) >= 0.5 for r in pos])
    )


def test_cli_refuses_a_store_tiled_differently_and_goes_on(
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    stores_copy: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, labels_csv = small_cohort
    tile_cohort_slide(labels_csv, "synth_000", tmp_path / "other", TilingSpec(tile_px=64, mpp=2.0))
    shutil.rmtree(stores_copy / "synth_000.zarr")
    shutil.copytree(tmp_path / "other" / "synth_000.zarr", stores_copy / "synth_000.zarr")
    # a store without a label is left out
    shutil.copytree(stores_copy / "synth_001.zarr", stores_copy / "extra.zarr")
    zarr.open_group(str(stores_copy / "extra.zarr"), mode="r+").attrs["slide_id"] = "extra"
    out = tmp_path / "ev"
    args = ["evaluate", str(stores_copy), "--run", str(fast_run), "--labels", str(labels_csv)]
    code = main([*args, "--out", str(out), "--n-boot", str(N_BOOT), "--device", "cpu", "-q"])
    assert code == 1  # one slide failed; the others were evaluated
    printed = capsys.readouterr().out.strip()
    assert printed.count("\n") == 0
    assert printed.startswith("evaluated 7 slide(s): AUC ") and "n=7; 1 failed" in printed
    res = read_strict_json(out / evaluation.EVALUATION)
    assert res["n"] == 7 and res["n_labelled"] == 8 and res["unlabelled_stores"] == 1
    assert [f["slide_id"] for f in res["failed"]] == ["synth_000"]
    assert "tiled at 2 mpp, the run was trained at 1 mpp" in res["failed"][0]["error"]
    table = _table(out / evaluation.EVALUATION_TABLE)
    assert "extra" not in table and table["synth_000"]["p_0"] == ""
    assert "tiled at 2 mpp" in table["synth_000"]["error"]
    _check_metrics(res["metrics"])


def test_label_errors_are_one_line_before_any_work(
    small_cohort: tuple[Path, Path],
    fast_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stores, _ = small_cohort
    out = tmp_path / "ev"
    ghost = write_labels(tmp_path / "ghost.csv", [("synth_000", "0"), ("ghost", "1")])
    with pytest.raises(TrainingError, match=r"without a complete store.*'ghost': no store"):
        evaluate(stores, fast_run, ghost, out, progress=False)
    unknown = write_labels(tmp_path / "unknown.csv", [("synth_000", "0"), ("synth_001", "2")])
    with pytest.raises(ConfigError, match=r"label\(s\) '2' are not classes of the run .*'0', '1'"):
        evaluate(stores, fast_run, unknown, out, progress=False)
    with pytest.raises(ConfigError, match="n_boot must be an integer >= 100"):
        evaluate(stores, fast_run, unknown, out, n_boot=10, progress=False)
    assert not out.exists()  # refused before predicting
    base = ["evaluate", str(stores), "--run", str(fast_run), "--out", str(out), "-q"]
    # labels without stores: the same error (and exit status) as train
    train_args = ["--labels", str(ghost), "--out", str(tmp_path / "r"), "-q"]
    train_code = main(["train", str(stores), *train_args])
    train_err = capsys.readouterr().err
    assert main([*base, "--labels", str(ghost)]) == train_code == 1
    err = capsys.readouterr().err
    assert err == train_err and err.count("\n") == 1 and "'ghost': no store" in err
    empty = tmp_path / "empty.csv"
    empty.write_text("slide_id,label\nsynth_000,0\nsynth_001,\n")
    assert main([*base, "--labels", str(empty)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main([*base, "--labels", str(unknown)]) == 2
    assert "not classes of the run" in capsys.readouterr().err
    assert main([*base, "--labels", str(unknown), "--n-boot", "5"]) == 2
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# metrics without a run
# ---------------------------------------------------------------------------------------------
def test_single_class_cohort_gives_null_and_a_reason(tmp_path: Path) -> None:
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    m = slide_metrics([0, 0, 0], probs, ["0", "1"], n_boot=N_BOOT)
    assert m["auc"] == {
        "value": None,
        "ci95": None,
        "reason": "needs slides of at least two classes",
    }
    assert m["balanced_accuracy"]["value"] is None
    assert m["sensitivity"]["value"] is None and "'1'" in m["sensitivity"]["reason"]
    assert m["specificity"]["value"] == pytest.approx(2 / 3)
    _check_metrics(m)
    atomic_write_json(tmp_path / "m.json", m)
    assert read_strict_json(tmp_path / "m.json") == m
    # no slides at all
    empty = slide_metrics([], np.zeros((0, 2)), ["0", "1"], n_boot=N_BOOT)
    assert all(v["value"] is None for v in empty.values())
    assert empty["auc"]["reason"] == "no slides were evaluated"


def test_metrics_are_seeded_and_follow_the_negative_class() -> None:
    rng = np.random.default_rng(3)
    y = np.arange(40) % 2
    p1 = np.clip(0.5 + 0.3 * (y - 0.5) + rng.normal(0, 0.2, 40), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    a = slide_metrics(y, probs, ["normal", "tumour"], n_boot=N_BOOT, seed=1)
    assert a == slide_metrics(y, probs, ["normal", "tumour"], n_boot=N_BOOT, seed=1)
    assert a != slide_metrics(y, probs, ["normal", "tumour"], n_boot=N_BOOT, seed=2)
    _check_metrics(a)
    # the abnormal class is the scored one, wherever the negative class sits
    flipped = slide_metrics(1 - y, probs[:, ::-1], ["abnormal", "normal"], n_boot=N_BOOT, seed=1)
    for name in ("auc", "sensitivity", "specificity", "balanced_accuracy", "brier"):
        assert flipped[name]["value"] == pytest.approx(a[name]["value"]), name
    assert a["sensitivity"]["value"] == pytest.approx(np.mean(p1[y == 1] >= 0.5))
    assert a["specificity"]["value"] == pytest.approx(np.mean(p1[y == 0] < 0.5))


# ---------------------------------------------------------------------------------------------
# three classes
# ---------------------------------------------------------------------------------------------
def test_three_classes_per_class_metrics_and_roc(
    three_class: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    stores, labels, run = three_class
    run = copy_run(run, tmp_path / "run3")
    res = evaluate(stores, run, labels, tmp_path / "ev", n_boot=N_BOOT, progress=False)
    assert res["classes"] == ["a", "b", "c"] and res["n"] == 8
    m = res["metrics"]
    assert "sensitivity" not in m and set(m["per_class"]) == {"a", "b", "c"}
    assert [m["per_class"][c]["n"] for c in "abc"] == [3, 3, 2]
    assert set(m["per_class"]["a"]) == {"n", "auc", "sensitivity", "specificity"}
    _check_metrics(m)
    per_class_auc = [m["per_class"][c]["auc"]["value"] for c in "abc"]
    assert m["auc"]["value"] == pytest.approx(np.mean(per_class_auc))
    assert read_strict_json(tmp_path / "ev" / evaluation.EVALUATION)["n"] == 8
    assert (tmp_path / "ev" / "roc.png").read_bytes().startswith(b"\x89PNG")
    # roc.png draws one curve per class, one vs the rest
    table = _table(tmp_path / "ev" / evaluation.EVALUATION_TABLE)
    targets = ["abc".index(r["label"]) for r in table.values()]
    probs = np.array([[float(r[f"p_{c}"]) for c in "abc"] for r in table.values()])
    fig = roc_figure({"": {"n": 8, "targets": targets, "probs": probs}}, ["a", "b", "c"])
    (ax,) = fig.axes
    curves = [ln for ln in ax.lines if not ln.get_label().startswith("_")]
    assert len(curves) == 3
    assert [ln.get_label().split()[0] for ln in curves] == ["a", "b", "c"]


def test_evaluate_command_help_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    import click

    from wsi_pipeline.cli import cli

    assert main(["--help"]) == 0 and "evaluate" in capsys.readouterr().out
    assert main(["evaluate", "--help"]) == 0
    assert "--labels" in capsys.readouterr().out
    cmd = cli.commands["evaluate"]
    ctx = click.Context(cmd, info_name="evaluate")
    for opt in (p for p in cmd.params if isinstance(p, click.Option)):
        assert opt.help and opt.help.strip(), opt.opts[0]
        default = opt.get_default(ctx, call=False)
        if not (opt.required or opt.is_flag) and default is not None:
            assert opt.get_help_extra(ctx).get("default") == str(default), opt.opts[0]
    assert main(["evaluate", "stores"]) == 2  # --run, --labels and --out are required

"""The real command line against bad inputs: one line naming the file, the README's exit status.

Each case runs ``python -m wsi_pipeline`` as a subprocess, as a user would, on a bad pipeline
file (a YAML/JSON syntax error, a list, a scalar, missing, a folder), a labels or options file
that is a folder, a mask file that is a folder, an empty slide folder, an output under a regular
file for the commands whose ``--out`` ``test_util`` does not already cover (heatmap, export,
report, pretrain, features ``--export-h5``, a pipeline's ``out``), and unknown options. Bad
usage is exit status 2 (README, "The command line"); stderr has no traceback, and its error line
names the file (or the option) and the reason. ``--debug`` still shows the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad inputs: broken pipeline files, folders where files are expected, a
    regular file ``afile`` where an output folder would go, an empty slide folder."""
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "syntax.yaml").write_text("out: o\nsynth: {n_slides: [\n")
    (d / "bad.json").write_text('{"out": "o",\n "tile": }\n')
    (d / "list.yaml").write_text("- tile\n- train\n")
    (d / "scalar.yaml").write_text("just a string\n")
    for folder in ("folder.yaml", "labels.csv", "mask.png", "empty"):
        (d / folder).mkdir()
    (d / "afile").write_text("x")
    (d / "out_under_file.yaml").write_text(
        f"out: {d / 'afile' / 'sub'}\nslides: {d / 'empty'}\nstages: [tile]\ntile: {{mpp: 1.0}}\n"
    )
    (d / "out_is_file.yaml").write_text(
        f"out: {d / 'afile'}\nslides: {d / 'empty'}\nstages: [tile]\ntile: {{mpp: 1.0}}\n"
    )
    return d


# (id, argv with {bad} = the bad-inputs folder, {stores} / {run} = fixtures, what the error line
# must contain besides the file)
CASES = [
    ("yaml-syntax", ["run", "{bad}/syntax.yaml"], "not valid YAML/JSON (line 3, column 1:"),
    ("json-syntax", ["run", "{bad}/bad.json"], "not valid YAML/JSON (line 2, column 10:"),
    ("yaml-list", ["run", "{bad}/list.yaml"], "must be a mapping of option: value"),
    ("yaml-scalar", ["run", "{bad}/scalar.yaml", "--check"], "must be a mapping"),
    ("no-pipeline", ["run", "{bad}/missing.yaml"], "file not found"),
    ("pipeline-folder", ["run", "{bad}/folder.yaml"], "is a folder, not a file"),
    (
        "pipeline-out-under-file",
        ["run", "{bad}/out_under_file.yaml"],
        "{bad}/afile is a file, not a folder",
    ),
    (
        "pipeline-out-under-file-check",
        ["run", "{bad}/out_under_file.yaml", "--check"],
        "{bad}/afile is a file, not a folder",
    ),
    (
        "pipeline-out-is-file-check",
        ["run", "{bad}/out_is_file.yaml", "--check"],
        "it is a file, not a folder",
    ),
    (
        "labels-folder",
        ["train", "{stores}", "--labels", "{bad}/labels.csv", "--out", "{bad}/r"],
        "is a folder, not a labels file",
    ),
    (
        "config-folder",
        [
            "train",
            "{stores}",
            "--labels",
            "{labels}",
            "--out",
            "{bad}/r",
            "--config",
            "{bad}/folder.yaml",
        ],
        "is a folder, not a file",
    ),
    (
        "mask-folder",
        ["tile", "{slide}", "--out", "{bad}/o", "--mask-file", "{bad}/mask.png"],
        "is a folder, not a mask file",
    ),
    ("empty-slides", ["tile", "{bad}/empty", "--out", "{bad}/o"], "no slide files found in"),
    (
        "heatmap-out",
        ["heatmap", "{stores}", "--run", "{run}", "--out", "{bad}/afile/sub"],
        "output folder cannot be written",
    ),
    ("export-out", ["export", "{run}", "--out", "{bad}/afile/sub"], "is a file, not a folder"),
    # not "predicted 0 of 0", exit 0
    (
        "predict-no-stores",
        ["predict", "{bad}/empty", "--run", "{run}", "--out", "{bad}/p"],
        "no stores (*.zarr) in",
    ),
    (
        "heatmap-no-stores",
        ["heatmap", "{bad}/empty", "--run", "{run}", "--out", "{bad}/h"],
        "no stores (*.zarr) in",
    ),
    (
        "report-dest",
        ["report", "{bad}/empty", "--dest", "{bad}/afile/r.html"],
        "it is a file, not a folder",
    ),
    (
        "pretrain-out",
        ["pretrain", "{stores}", "--out", "{bad}/afile/w.pt", "--epochs", "1"],
        "it is a file, not a folder",
    ),
    (
        "features-export",
        [
            "features",
            "{stores}",
            "--backbone",
            "smallcnn",
            "--weights",
            "none",
            "--export-h5",
            "{bad}/afile/h5",
        ],
        "is a file, not a folder",
    ),
    ("unknown-option", ["tile", "{bad}/empty", "--out", "o", "--bogus"], "No such option"),
    ("unknown-run-option", ["run", "{bad}/list.yaml", "--fast"], "No such option"),
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "wsi_pipeline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(("argv", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_the_file_exit_2(
    argv: list[str], reason: str, bad: Path, request: pytest.FixtureRequest
) -> None:
    names: dict[str, str] = {"bad": str(bad)}
    text = " ".join(argv)
    if "{stores}" in text or "{labels}" in text or "{slide}" in text:
        stores, labels = request.getfixturevalue("small_cohort")
        slide = next((labels.parent / "slides").iterdir())
        names.update(stores=str(stores), labels=str(labels), slide=str(slide))
    if "{run}" in text:
        names["run"] = str(request.getfixturevalue("fast_run"))
    args = [a.format(**names) for a in argv]
    r = cli(*args)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 2, r.stderr
    # one line; progress (INFO) lines before it are allowed, no other warning or error
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("INFO: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert reason.format(**names) in lines[0], lines
    if "No such option" in reason:  # names the option and the command, not a file
        assert args[-1] in lines[0] and f"wsi-pipeline {args[0]}" in lines[0]
    else:  # names the bad file or folder: an argument, or the folder of one that is in the way
        inside = [Path(a) for a in args if a.startswith(str(bad))]
        named = [q for p in inside for q in (p, *p.parents) if bad in q.parents]
        in_reason = str(bad) in reason.format(**names)  # the file in the way, named above
        assert in_reason or any(str(q) in lines[0] for q in named), (lines[0], args)


def test_debug_shows_the_traceback(bad: Path) -> None:
    r = cli("run", str(bad / "folder.yaml"), "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr

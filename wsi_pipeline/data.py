"""Labels, splits and bags of patches (or cached features) read from the stores.

Everything here is checked before training starts: a labels row without a complete store, an
unknown split name, duplicate slide ids, a single-class training set, or stores tiled with
different tile sizes or resolutions each raise one clear error.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, StoreError, TrainingError
from .specs import tiling_mismatch
from .store import (
    COORDS,
    PatchReader,
    features_key,
    is_complete,
    list_stores,
    open_store,
    store_path,
)
from .util import input_file, sanitize_id

__all__ = [
    "SPLIT_NAMES",
    "BagDataset",
    "LabelRow",
    "Labels",
    "augment_bag",
    "check_tiling",
    "make_splits",
    "negative_class",
    "read_labels",
    "resolve_stores",
]

log = logging.getLogger(__name__)

#: The split names a labels file may use (aliases such as ``validation`` are mapped to these).
SPLIT_NAMES = ("train", "val", "test")
_SPLIT_ALIASES = {"training": "train", "valid": "val", "validation": "val", "testing": "test"}


@dataclass(frozen=True)
class LabelRow:
    """One row of a labels file (``split`` and ``case_id`` are optional columns)."""

    slide_id: str
    label: str
    split: str | None = None
    case_id: str | None = None


@dataclass(frozen=True)
class Labels:
    """A parsed labels file.

    Attributes
    ----------
    rows : tuple of LabelRow
    classes : tuple of str
        Class names in index order (integers sort numerically, names alphabetically).
    path : str
    """

    rows: tuple[LabelRow, ...]
    classes: tuple[str, ...]
    path: str

    def index(self, label: str) -> int:
        """Class index of ``label`` (ValueError for an unknown one)."""
        return self.classes.index(label)


def read_labels(path: str | os.PathLike) -> Labels:
    """Read ``labels.csv``: ``slide_id,label`` and optional ``split`` and ``case_id`` columns.

    Strict, so that a labels file can never silently train on the wrong classes: each class has
    one spelling (``1`` next to ``1.0`` or ``True``, or ``Tumor`` next to ``tumor``, is refused,
    not read as extra classes), no label may be empty or NaN, no two slide ids may name the same
    store (:func:`wsi_pipeline.util.sanitize_id`), and a ``split`` column keeps each ``case_id``
    in one split.

    Raises
    ------
    ConfigError
        Missing file or columns; an empty or NaN label, two spellings of one class, duplicate
        slide ids or ids that map to one store name, unknown split names, a case in two splits.
        The message names the file and the line.
    """
    p = input_file(path, "labels file")
    try:
        with open(p, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in (reader.fieldnames or [])]
            raw = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, csv.Error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: unreadable labels file ({exc})") from exc
    missing = {"slide_id", "label"} - set(fields)
    if missing:
        raise ConfigError(
            f"{p}: missing column(s) {', '.join(sorted(missing))} "
            f"(found: {', '.join(fields) or 'none'})"
        )
    rows: list[LabelRow] = []
    seen: dict[str, int] = {}
    stores: dict[str, tuple[str, int]] = {}  # store name -> (slide id, line)
    spellings: dict[Any, tuple[str, int]] = {}  # class key -> (first spelling, line)
    case_splits: dict[str, tuple[str, int]] = {}  # case id -> (split, line)
    for line, r in enumerate(raw, start=2):
        sid, label = r.get("slide_id", ""), r.get("label", "")
        if not sid:
            raise ConfigError(f"{p}:{line}: empty slide_id")
        if not label or label.lower() in _MISSING_LABELS:
            shown = repr(label) if label else "empty"
            raise ConfigError(
                f"{p}:{line}: label of {sid!r} is {shown}; give every slide a class or drop its row"
            )
        if sid in seen:
            raise ConfigError(f"{p}:{line}: duplicate slide id {sid!r} (first on line {seen[sid]})")
        seen[sid] = line
        name = sanitize_id(sid)
        if name in stores:
            other, first = stores[name]
            raise ConfigError(
                f"{p}:{line}: slide ids {other!r} (line {first}) and {sid!r} both map to the "
                f"store {name}.zarr; rename one of them"
            )
        stores[name] = (sid, line)
        key = _class_key(label)
        first_spelling, first_line = spellings.setdefault(key, (label, line))
        if first_spelling != label:
            raise ConfigError(
                f"{p}:{line}: label {label!r} is another spelling of {first_spelling!r} "
                f"(line {first_line}); use one spelling per class"
            )
        split = r.get("split") or None
        if split is not None:
            split = _SPLIT_ALIASES.get(split.lower(), split.lower())
            if split not in SPLIT_NAMES:
                raise ConfigError(
                    f"{p}:{line}: unknown split {r.get('split')!r} for {sid!r} "
                    f"(use one of {', '.join(SPLIT_NAMES)})"
                )
        case = r.get("case_id") or None
        if case is not None and split is not None:
            other_split, other_line = case_splits.setdefault(case, (split, line))
            if other_split != split:
                raise ConfigError(
                    f"{p}:{line}: case {case!r} is in split {split!r} here and in "
                    f"{other_split!r} on line {other_line}; all slides of a case belong to "
                    "one split"
                )
        rows.append(LabelRow(sid, label, split, case))
    if not rows:
        raise ConfigError(f"{p}: no labelled slides")
    names = sorted({r.label for r in rows})
    keys = [_class_key(n) for n in names]
    if all(isinstance(k, float) for k in keys):
        names = [n for _, n in sorted(zip(keys, names))]
    return Labels(tuple(rows), tuple(names), str(p))


#: Label cells that mean "no label" (compared case-insensitively): refused, never a class.
_MISSING_LABELS = frozenset({"nan", "-nan", "+nan", "na", "n/a", "#n/a", "<na>", "null"})
_BOOLS = {"true": 1.0, "false": 0.0}


def _class_key(label: str) -> float | str:
    """What a label means, for "one spelling per class": its number (``1``, ``1.0``, ``01``,
    ``True`` are all 1.0), else its case-folded text."""
    low = label.strip().casefold()
    if low in _BOOLS:
        return _BOOLS[low]
    try:
        value = float(low)
    except ValueError:
        return low
    return value if math.isfinite(value) else low


_NEGATIVE_NAMES = ("0", "normal", "negative", "benign", "healthy", "no", "false", "absent")


def negative_class(classes: Sequence[str]) -> int:
    """Index of the "nothing abnormal" class: ``0``/``normal``/``negative``/``benign``/... when
    present (case-insensitive), else the first class. Per-patch abnormality is 1 - p(this)."""
    low = [c.lower() for c in classes]
    for name in _NEGATIVE_NAMES:
        if name in low:
            return low.index(name)
    return 0


def resolve_stores(
    store_dir: str | os.PathLike, labels: Labels, *, require_patches: bool = True
) -> tuple[dict[str, Path], list[str]]:
    """Map each labelled slide to its complete store.

    Returns
    -------
    stores : dict of slide_id -> Path
        Complete stores with at least one patch.
    skipped : list of str
        Slides whose stores are complete but hold no patches (warned about, left out).

    Stores in ``store_dir`` that no labels row names are not used; they are listed in one INFO
    log line (how many, and the first few names).

    Raises
    ------
    TrainingError
        When a labelled slide's store is missing or unfinished (lists the first few).
    """
    d = Path(store_dir)
    if not d.is_dir():
        raise TrainingError(f"{d}: no such folder of stores; run 'wsi-pipeline tile' first")
    stores: dict[str, Path] = {}
    skipped: list[str] = []
    problems: list[str] = []
    for r in labels.rows:
        sp = store_path(d, r.slide_id)
        if not sp.exists():
            problems.append(f"{r.slide_id!r}: no store {sp.name}")
            continue
        if not is_complete(sp):
            problems.append(f"{r.slide_id!r}: store {sp.name} is unfinished")
            continue
        g = open_store(sp)
        if require_patches and int(g[COORDS].shape[0]) == 0:
            log.warning(
                "%s: store has no patches (status %s); left out",
                sp,
                g.attrs.get("tiling", {}).get("status"),
            )
            skipped.append(r.slide_id)
            continue
        stores[r.slide_id] = sp
    _log_unlabelled(d, labels)
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise TrainingError(
            f"{labels.path}: labelled slides without a complete store in {d}: "
            f"{'; '.join(problems[:3])}{more}; run 'wsi-pipeline tile' first"
        )
    return stores, skipped


def _log_unlabelled(store_dir: Path, labels: Labels, *, show: int = 5) -> None:
    """One INFO line for the stores in ``store_dir`` that no labels row names (not used)."""
    named = {store_path(store_dir, r.slide_id).name for r in labels.rows}
    extra = [sp.stem for sp in list_stores(store_dir) if sp.name not in named]
    if extra:
        more = f", ... ({len(extra) - show} more)" if len(extra) > show else ""
        log.info(
            "%s: %d store(s) without a label in %s, not used: %s%s",
            store_dir,
            len(extra),
            labels.path,
            ", ".join(extra[:show]),
            more,
        )


def check_tiling(stores: dict[str, Path]) -> dict[str, Any]:
    """The tiling shared by all stores (tile size, mpp or downsample).

    Raises
    ------
    TrainingError
        When stores were tiled with different tile sizes or resolutions
        (:func:`wsi_pipeline.specs.tiling_mismatch`).
    """
    first: tuple[str, dict[str, Any]] | None = None
    for sid, sp in stores.items():
        t = dict(open_store(sp).attrs["tiling"])
        if first is None:
            first = (
                sid,
                {
                    "tile_px": int(t["tile_px"]),
                    "mpp": t.get("mpp"),
                    "downsample": float(t["downsample"]),
                },
            )
            continue
        why = tiling_mismatch(t, first[1], reference_name=f"{first[0]!r} was tiled")
        if why:
            raise TrainingError(f"{sp}: {why}; re-tile so all slides match")
    if first is None:
        raise TrainingError("no stores with patches to train on")
    return first[1]


def make_splits(
    labels: Labels,
    slide_ids: Sequence[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    folds: int | None = None,
    fold: int = 0,
) -> dict[str, str]:
    """Assign each slide to ``train``, ``val`` or ``test``.

    Uses the labels' ``split`` column when present; otherwise a seeded split, stratified by
    label and grouped by ``case_id`` (all slides of a case land in one split). With ``folds=K``,
    fold ``fold`` of a K-fold split (grouped and stratified the same way) is ``val`` and the rest
    ``train``.

    Raises
    ------
    ConfigError
        Bad fractions or folds, a split column present for only some rows.
    TrainingError
        A training set with a single class, or an empty training set.
    """
    wanted = set(slide_ids)
    rows = [r for r in labels.rows if r.slide_id in wanted]
    given = [r.split for r in rows]
    if folds is None and any(s is not None for s in given):
        if any(s is None for s in given):
            missing = [r.slide_id for r in rows if r.split is None][:3]
            raise ConfigError(
                f"{labels.path}: 'split' is empty for {', '.join(missing)}; "
                "fill it for every row or drop the column"
            )
        splits = {r.slide_id: r.split for r in rows if r.split is not None}
    else:
        splits = _grouped_split(
            rows,
            seed=seed,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            folds=folds,
            fold=fold,
        )
    train_labels = {r.label for r in rows if splits[r.slide_id] == "train"}
    if not train_labels:
        raise TrainingError(f"{labels.path}: the training split is empty")
    if len(train_labels) < 2:
        raise TrainingError(
            f"{labels.path}: the training split has a single class "
            f"({next(iter(train_labels))!r}); MIL needs at least two"
        )
    return splits


def _grouped_split(
    rows: list[LabelRow],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    folds: int | None,
    fold: int,
) -> dict[str, str]:
    if folds is not None:
        if folds < 2:
            raise ConfigError(f"folds must be >= 2, not {folds}")
        if not (0 <= fold < folds):
            raise ConfigError(f"fold must be in 0..{folds - 1}, not {fold}")
    elif not (
        0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1
    ):
        raise ConfigError("val and test fractions must be in [0, 1) and sum to less than 1")
    # a case is the unit; its label is its slides' most common label
    cases: dict[str, list[LabelRow]] = {}
    for r in rows:
        cases.setdefault(r.case_id or r.slide_id, []).append(r)
    by_label: dict[str, list[str]] = {}
    for cid, rs in sorted(cases.items()):
        labs = [r.label for r in rs]
        by_label.setdefault(max(set(labs), key=labs.count), []).append(cid)
    rng = np.random.default_rng(seed)
    assign: dict[str, str] = {}
    for lab in sorted(by_label):
        cids = list(by_label[lab])
        rng.shuffle(cids)
        n = len(cids)
        if folds is not None:
            for k, cid in enumerate(cids):
                assign[cid] = "val" if k % folds == fold else "train"
            continue
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:  # keep every split non-empty when asked for and possible
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        for k, cid in enumerate(cids):
            assign[cid] = "test" if k < n_test else "val" if k < n_test + n_val else "train"
    return {r.slide_id: assign[r.case_id or r.slide_id] for r in rows}


# --------------------------------------------------------------------------------------------
# bags
# --------------------------------------------------------------------------------------------
def _item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Randomness of one bag in one epoch: independent of worker and order (so resumable)."""
    return np.random.default_rng([seed, epoch, index, 0x5EED])


def augment_bag(
    patches: np.ndarray, rng: np.random.Generator, *, jitter: float = 0.15
) -> np.ndarray:
    """H&E augmentations of a ``(K, T, T, 3)`` uint8 bag: per-patch flips and 90° rotations,
    per-bag mild brightness/contrast/saturation jitter (±``jitter``)."""
    out = np.empty_like(patches)
    rots = rng.integers(0, 4, len(patches))
    flips = rng.integers(0, 2, len(patches))
    for i, p in enumerate(patches):
        q = np.rot90(p, int(rots[i]))
        out[i] = q[:, ::-1] if flips[i] else q
    if jitter > 0:
        b, c, s = 1 + rng.uniform(-jitter, jitter, 3)
        x = out.astype(np.float32)
        gray = x.mean(axis=3, keepdims=True)
        x = gray + (x - gray) * s  # saturation
        x = (x - 128.0) * c + 128.0  # contrast
        x = x * b  # brightness
        out = np.clip(x + 0.5, 0, 255).astype(np.uint8)
    return out


class BagDataset:
    """Bags of one slide each: patches ``(K, 3, T, T)`` uint8 (end-to-end mode) or features
    ``(K, D)`` float32 (features mode), with the slide's class index.

    A torch ``Dataset`` by duck typing (``__len__``/``__getitem__``), so this module does not
    import torch until items are made.

    Parameters
    ----------
    stores : sequence of Path
        Complete stores, one per bag.
    targets : sequence of int
        Class index per bag.
    max_patches : int or None
        Bag size cap: a seeded random subset of at most this many patches per epoch (all patches
        when None or when the slide has fewer).
    features : str or None
        ``features/<name>`` array to read instead of patches.
    augment : bool
        Training augmentations (patches only).
    jitter : float
        Strength of the per-bag colour jitter (see :func:`augment_bag`).
    seed : int
    """

    def __init__(
        self,
        stores: Sequence[Path],
        targets: Sequence[int],
        *,
        max_patches: int | None = None,
        features: str | None = None,
        augment: bool = False,
        jitter: float = 0.15,
        seed: int = 0,
    ) -> None:
        if len(stores) != len(targets):
            raise ValueError("one target per store")
        self.stores = [Path(s) for s in stores]
        self.targets = [int(t) for t in targets]
        self.max_patches = max_patches
        self.features = features
        self.augment = augment
        self.jitter = float(jitter)
        self.seed = seed
        self.epoch = 0
        self._readers: dict[int, Any] = {}
        self.n_patches = [int(open_store(s)[COORDS].shape[0]) for s in self.stores]

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's patch subsets and augmentations (seeded by ``(seed, epoch, bag)``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.stores)

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_readers"] = {}
        return d

    def indices(self, i: int) -> np.ndarray:
        """Patch indices of bag ``i`` this epoch (sorted, so reads go shard by shard)."""
        n = self.n_patches[i]
        if self.max_patches is None or n <= self.max_patches:
            return np.arange(n)
        rng = _item_rng(self.seed, self.epoch, i)
        return np.sort(rng.choice(n, self.max_patches, replace=False))

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        import torch

        idx = self.indices(i)
        if self.features is not None:
            arr = self._feature_array(i, self.features)
            x = torch.from_numpy(
                np.asarray(arr.get_orthogonal_selection((idx, slice(None))), dtype=np.float32)
            )
            return x, self.targets[i], i
        reader = self._readers.get(i)
        if reader is None:
            reader = self._readers[i] = PatchReader(self.stores[i])
        patches = reader.read(idx)
        if self.augment:
            patches = augment_bag(
                patches, _item_rng(self.seed + 1, self.epoch, i), jitter=self.jitter
            )
        x = torch.from_numpy(np.ascontiguousarray(patches.transpose(0, 3, 1, 2)))
        return x, self.targets[i], i

    def _feature_array(self, i: int, name: str) -> Any:
        g = open_store(self.stores[i])
        key = features_key(name)
        try:
            return g[key]
        except KeyError as exc:
            raise StoreError(
                f"no {key!r}; run the features step first", path=self.stores[i]
            ) from exc

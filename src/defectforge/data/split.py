"""Train/test split of the source images: seeded, deterministic, recorded per row.

``split_sources(df, scheme=...)`` adds two columns to a source table (from
:func:`defectforge.data.adapters.ingest`):

* ``split``: ``"train"`` (the generator may learn from the image; defect-free train
  images are the canvases new defects are drawn on) or ``"test"`` (held out for
  evaluating the detector, never seen by a generator);
* ``fold``: the fold a defect image belongs to: ``0..k-1`` under ``kfold`` (test where it
  equals the requested ``fold``), ``0`` for every defect image under ``third`` (one fixed
  split), and ``-1`` for defect-free images, which are not split by fold (they keep one
  train/test assignment whatever the fold).

Defect images, per ``(category, defect_type)``, with ids in natural order (``img2``
before ``img10``):

``third``
    AnomalyDiffusion (Hu et al., AAAI 2024, "Experiment Settings / Dataset": "one-third of
    the anomaly data with the lowest ID numbers as the training set, reserving the
    remaining two-thirds for testing"): the lowest ``ceil(n / 3)`` sorted ids train the
    generator, the rest is test. At least one image trains, and at least one is left for
    test when ``n >= 2``.
``kfold``
    The DDIM-inversion paper's protocol (§4.1: "split each anomaly dataset into two folds:
    one fold is used for training the generative model, and the other for evaluating",
    results averaged over the folds), generalised to ``k``: the sorted ids are shuffled
    with a generator seeded by ``(seed, category, defect_type)`` and dealt round-robin
    into ``k`` folds; images of fold ``fold`` are test, the others train. Over
    ``fold = 0..k-1`` every image is test exactly once. With ``n < k`` some folds get no
    image of that type.

Defect-free images, per category: where the source dataset says which images are train
and which test (``origin``, e.g. MVTec AD's ``train/good`` and ``test/good``) and that
leaves at least one of each, that split is kept (images of ``origin="unspecified"`` among
them are dealt by the seeded fraction below). Otherwise a seeded shuffle puts
``round(good_test_fraction * n)`` images in test, at least one and leaving at least one
for training when ``n >= 2``.

Example
-------
>>> import pandas as pd
>>> df = pd.DataFrame({"image_id": [f"tile/crack/{i}" for i in range(1, 7)],
...                    "category": "tile", "defect_type": "crack", "origin": "test"})
>>> split_sources(df, scheme="third")["split"].tolist()
['train', 'train', 'test', 'test', 'test', 'test']
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from defectforge.errors import DataError, ParamsError
from defectforge.seeding import keyed_rng

SCHEMES = ("third", "kfold")
GOOD = "good"
REQUIRED = ("image_id", "category", "defect_type")


def natural_key(text: str) -> tuple:
    """Sort key that orders the digit runs of ``text`` by value: ``a2 < a10``."""
    parts = re.split(r"(\d+)", str(text))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts if p)


def split_sources(
    df: pd.DataFrame,
    *,
    scheme: str = "third",
    k: int = 2,
    fold: int = 0,
    seed: int = 0,
    good_test_fraction: float = 0.3,
) -> pd.DataFrame:
    """Return a copy of ``df`` with the columns ``split`` and ``fold`` (see module doc).

    Args:
        df: source table with at least ``image_id``, ``category``, ``defect_type``;
            ``origin`` (``train``/``test``/``unspecified``) is used for defect-free images
            when present.
        scheme: ``"third"`` or ``"kfold"``.
        k: number of folds (``kfold`` only), at least 2.
        fold: the fold held out as test (``kfold`` only), ``0 <= fold < k``.
        seed: seeds the k-fold deal and the defect-free shuffle.
        good_test_fraction: share of defect-free images sent to test where the source
            has no usable split of its own, strictly between 0 and 1.

    Raises:
        ParamsError: an unknown scheme or an invalid ``k``, ``fold``, ``seed`` or
            fraction (named ``split.<key>``).
        DataError: ``df`` lacks a required column or has duplicate ``image_id``.
    """
    if scheme not in SCHEMES:
        raise ParamsError(f"split.scheme={scheme!r}: unknown scheme; allowed: {', '.join(SCHEMES)}")
    if not _is_int(k) or k < 2:
        raise ParamsError(f"split.k={k!r}: must be an integer >= 2")
    if not _is_int(fold) or not 0 <= fold < k:
        raise ParamsError(f"split.fold={fold!r}: must be an integer in 0..{k - 1} (split.k={k})")
    if not _is_int(seed) or seed < 0:
        raise ParamsError(f"split.seed={seed!r}: must be an integer >= 0")
    if isinstance(good_test_fraction, bool) or not isinstance(good_test_fraction, (int, float)) or not (
        0.0 < good_test_fraction < 1.0
    ):
        raise ParamsError(f"split.good_test_fraction={good_test_fraction!r}: must be a number strictly between 0 and 1")
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise DataError(f"source table lacks the column(s) {', '.join(missing)}")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise DataError(f"source table has a duplicate image_id {dup.iloc[0]!r}")

    out = df.copy()
    split = pd.Series("train", index=out.index, dtype=object)
    folds = pd.Series(-1, index=out.index, dtype="int64")
    origin = out["origin"] if "origin" in out.columns else pd.Series("unspecified", index=out.index)

    for (category, defect_type), group in out.groupby(["category", "defect_type"], sort=True):
        ids = sorted(group.index, key=lambda i: natural_key(out.at[i, "image_id"]))
        if defect_type == GOOD:
            test = _good_test(ids, origin, category, seed, good_test_fraction)
            split.loc[list(test)] = "test"
            continue
        if scheme == "third":
            n_train = _third(len(ids))
            split.loc[ids[n_train:]] = "test"
            folds.loc[ids] = 0
        else:
            order = keyed_rng(seed, "kfold", category, defect_type).permutation(len(ids))
            for position, j in enumerate(order):
                folds.at[ids[j]] = position % k
            split.loc[[i for i in ids if folds.at[i] == fold]] = "test"

    out["split"] = split
    out["fold"] = folds
    return out


def _third(n: int) -> int:
    """Number of train images under AnomalyDiffusion's rule for a type with n images."""
    n_train = max(1, math.ceil(n / 3))
    return min(n_train, n - 1) if n >= 2 else n_train


def _good_test(ids: list, origin: pd.Series, category: str, seed: int, fraction: float) -> set:
    """Indices of the defect-free images of one category that go to test."""
    labels = [origin.at[i] for i in ids]
    if "train" in labels and "test" in labels:
        test = {i for i, o in zip(ids, labels) if o == "test"}
        rest = [i for i, o in zip(ids, labels) if o not in ("train", "test")]
        if rest:
            order = keyed_rng(seed, "good", category).permutation(len(rest))
            n_test = round(fraction * len(rest))
            test |= {rest[j] for j in order[:n_test]}
        return test
    n = len(ids)
    if n < 2:
        return set()
    n_test = min(max(1, round(fraction * n)), n - 1)
    order = keyed_rng(seed, "good", category).permutation(n)
    return {ids[j] for j in order[:n_test]}




def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

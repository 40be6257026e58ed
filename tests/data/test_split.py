"""Split rules: AnomalyDiffusion's lowest third, the DDIM-inversion k-fold, defect-free images."""

from __future__ import annotations

import pandas as pd
import pytest

from defectforge.data.split import natural_key, split_sources
from defectforge.errors import DataError, ParamsError


def table(groups: dict[tuple[str, str], int], good: dict[str, tuple[int, int]] | None = None) -> pd.DataFrame:
    """Defect rows per (category, defect_type), and (n_train_origin, n_test_origin) goods per category."""
    rows = []
    for (cat, defect), n in groups.items():
        rows += [dict(image_id=f"{cat}/{defect}/img{i}", category=cat, defect_type=defect, origin="test") for i in range(n)]
    for cat, (n_train, n_test) in (good or {}).items():
        rows += [dict(image_id=f"{cat}/good/train-{i:03d}", category=cat, defect_type="good", origin="train") for i in range(n_train)]
        rows += [dict(image_id=f"{cat}/good/test-{i:03d}", category=cat, defect_type="good", origin="test") for i in range(n_test)]
    # shuffled on purpose: the result must not depend on the input order
    return pd.DataFrame(rows).sample(frac=1.0, random_state=7).reset_index(drop=True)


def test_natural_key():
    ids = ["a/img10", "a/img2", "a/img1", "a/img2b", "b/img0"]
    assert sorted(ids, key=natural_key) == ["a/img1", "a/img2", "a/img2b", "a/img10", "b/img0"]


def test_third_takes_the_lowest_ids_in_natural_order():
    df = table({("tile", "crack"): 10})  # img0..img9
    df.loc[df["image_id"] == "tile/crack/img9", "image_id"] = "tile/crack/img10"
    out = split_sources(df, scheme="third").set_index("image_id")
    train = sorted(out.index[out["split"] == "train"], key=natural_key)
    assert train == ["tile/crack/img0", "tile/crack/img1", "tile/crack/img2", "tile/crack/img3"]  # ceil(10/3)
    assert (out["fold"] == 0).all()


@pytest.mark.parametrize("n, n_train", [(1, 1), (2, 1), (3, 1), (4, 2), (6, 2), (7, 3), (12, 4)])
def test_third_counts(n, n_train):
    out = split_sources(table({("c", "d"): n}), scheme="third")
    assert (out["split"] == "train").sum() == n_train
    assert (out["split"] == "test").sum() == n - n_train


def test_third_is_per_defect_type():
    out = split_sources(table({("c", "a"): 3, ("c", "b"): 9, ("e", "a"): 6}), scheme="third")
    counts = out[out["split"] == "train"].groupby(["category", "defect_type"]).size().to_dict()
    assert counts == {("c", "a"): 1, ("c", "b"): 3, ("e", "a"): 2}


@pytest.mark.parametrize("k", [2, 3])
def test_kfold_every_defect_row_is_test_exactly_once(k):
    df = table({("c", "a"): 7, ("c", "b"): 10, ("e", "a"): 5}, good={"c": (5, 2), "e": (4, 0)})
    runs = [split_sources(df, scheme="kfold", k=k, fold=f, seed=3).set_index("image_id") for f in range(k)]
    defect = runs[0]["defect_type"] != "good"
    times_test = sum((r["split"] == "test").astype(int) for r in runs)
    assert (times_test[defect] == 1).all()
    # each run: test rows are exactly the rows of that fold; fold ids agree between runs
    for f, r in enumerate(runs):
        assert ((r["split"] == "test") == (r["fold"] == f))[defect].all()
        assert r["fold"].equals(runs[0]["fold"])
    # folds are balanced within each defect type
    sizes = runs[0][defect].groupby(["category", "defect_type", "fold"]).size()
    for _, per_type in sizes.groupby(level=[0, 1]):
        assert per_type.max() - per_type.min() <= 1
    # defect-free rows are not folded: same assignment in every fold
    assert (runs[0].loc[~defect, "fold"] == -1).all()
    for r in runs[1:]:
        assert r.loc[~defect, "split"].equals(runs[0].loc[~defect, "split"])


def test_deterministic_and_seed_dependent():
    df = table({("c", "a"): 20}, good={"c": (20, 0)})
    a = split_sources(df, scheme="kfold", seed=1)
    pd.testing.assert_frame_equal(a, split_sources(df, scheme="kfold", seed=1))
    # the input order does not matter
    shuffled = df.sample(frac=1.0, random_state=3)
    b = split_sources(shuffled, scheme="kfold", seed=1).set_index("image_id").loc[a["image_id"]]
    assert b["split"].tolist() == a["split"].tolist()
    c = split_sources(df, scheme="kfold", seed=2)
    defect = a["defect_type"] == "a"
    assert not a.loc[defect, "fold"].equals(c.loc[defect, "fold"])
    assert not a.loc[~defect, "split"].equals(c.loc[~defect, "split"])


def test_kfold_groups_are_independent():
    one = split_sources(table({("c", "a"): 8}), scheme="kfold", seed=5).set_index("image_id")
    two = split_sources(table({("c", "a"): 8, ("c", "b"): 5}), scheme="kfold", seed=5).set_index("image_id")
    assert two.loc[one.index, "fold"].equals(one["fold"])


def test_good_keeps_the_source_split():
    out = split_sources(table({("c", "a"): 3}, good={"c": (6, 3)}))
    good = out[out["defect_type"] == "good"]
    assert (good["split"] == good["origin"]).all()
    assert (good["fold"] == -1).all()


@pytest.mark.parametrize("origins", [(10, 0), (0, 10)])
def test_good_without_usable_source_split_uses_the_fraction(origins):
    out = split_sources(table({("c", "a"): 3}, good={"c": origins}), good_test_fraction=0.3, seed=0)
    good = out[out["defect_type"] == "good"]
    assert (good["split"] == "test").sum() == 3
    assert (good["split"] == "train").sum() == 7


def test_good_unspecified_origin_and_tiny_counts():
    df = pd.DataFrame(
        [dict(image_id=f"m/good/{i}", category="m", defect_type="good", origin="unspecified") for i in range(2)]
        + [dict(image_id="n/good/0", category="n", defect_type="good", origin="unspecified")]
    )
    out = split_sources(df, good_test_fraction=0.1).set_index("image_id")
    assert sorted(out.loc[["m/good/0", "m/good/1"], "split"]) == ["test", "train"]  # at least one of each
    assert out.loc["n/good/0", "split"] == "train"


def test_without_origin_column_and_input_untouched():
    df = table({("c", "a"): 4}, good={"c": (4, 0)}).drop(columns="origin")
    before = df.copy()
    out = split_sources(df)
    pd.testing.assert_frame_equal(df, before)
    assert list(out.columns) == list(df.columns) + ["split", "fold"]
    assert out["fold"].dtype == "int64"
    assert set(out["split"]) == {"train", "test"}


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"scheme": "thirds"}, "split.scheme"),
        ({"k": 1}, "split.k"),
        ({"k": 2.0}, "split.k"),
        ({"fold": 2, "k": 2}, "split.fold"),
        ({"fold": -1}, "split.fold"),
        ({"seed": -3}, "split.seed"),
        ({"good_test_fraction": 0.0}, "split.good_test_fraction"),
        ({"good_test_fraction": 1.0}, "split.good_test_fraction"),
    ],
)
def test_bad_params(kwargs, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        split_sources(table({("c", "a"): 3}), **kwargs)


def test_bad_tables():
    with pytest.raises(DataError, match="defect_type"):
        split_sources(pd.DataFrame({"image_id": ["x"], "category": ["c"]}))
    df = table({("c", "a"): 2})
    df.loc[1, "image_id"] = df.loc[0, "image_id"]
    with pytest.raises(DataError, match="duplicate image_id"):
        split_sources(df)

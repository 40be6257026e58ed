"""The built-in sample: deterministic, MVTec AD layout, realistic masks, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defectforge.data import sample as sample_mod
from defectforge.data.adapters import ingest
from defectforge.data.sample import CATEGORIES, META_FILE, make_sample
from defectforge.errors import DataError, ParamsError

SMALL = dict(size=64, n_train_good=3, n_test_good=2, n_defect=2)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_args_give_byte_identical_files(tmp_path):
    a = files(make_sample(tmp_path / "a", seed=3, **SMALL))
    b = files(make_sample(tmp_path / "b", seed=3, **SMALL))
    assert a == b
    c = files(make_sample(tmp_path / "c", seed=4, **SMALL))
    assert a.keys() == c.keys()
    pngs = [k for k in a if k.endswith(".png")]
    assert all(a[k] != c[k] for k in pngs), "another seed must change every image"


def test_mvtec_layout_counts_and_masks(tmp_path):
    root = make_sample(tmp_path / "s", **SMALL)
    # what is on disk, not the constants: every category folder with >= 2 defect folders
    on_disk = {c.name: sorted(d.name for d in (c / "test").iterdir() if d.name != "good") for c in root.iterdir() if c.is_dir()}
    assert on_disk == {name: sorted(cat.defects) for name, cat in CATEGORIES.items()}
    assert len(on_disk) >= 2 and all(len(d) >= 2 for d in on_disk.values())
    for name, cat in CATEGORIES.items():
        assert len(list((root / name / "train/good").glob("*.png"))) == 3
        assert len(list((root / name / "test/good").glob("*.png"))) == 2
        for defect in cat.defects:
            assert sorted(p.name for p in (root / name / "test" / defect).iterdir()) == ["000.png", "001.png"]
            assert (root / name / "ground_truth" / defect / "001_mask.png").is_file()

    df = ingest("mvtec", root)  # validates every image and mask on the way
    n_cat = len(CATEGORIES)
    n_def = sum(len(c.defects) for c in CATEGORIES.values())
    assert len(df) == n_cat * (3 + 2) + n_def * 2
    assert set(df["width"]) == {64} and set(df["height"]) == {64}
    defects = df[df["defect_type"] != "good"]
    assert (defects["mask_area"] > 0).all()
    assert (defects["mask_area"] < 0.5 * 64 * 64).all()
    meta = json.loads((root / META_FILE).read_text())
    assert meta["args"]["size"] == 64 and meta["layout"] == "mvtec"


@pytest.mark.parametrize("kind", sorted({d for c in CATEGORIES.values() for d in c.defects}))
def test_defect_changes_exactly_the_masked_pixels(kind):
    """Outside the mask the image is the surface bit for bit; inside, the defect is visible."""
    cat = next(c for c in CATEGORIES.values() if kind in c.defects)
    texture = sample_mod._load_texture(cat.texture, 128)
    for k in range(4):
        rng = np.random.default_rng(k)
        surface = sample_mod._surface(texture, cat, 128, rng)
        image, mask = sample_mod._defect_image(surface, kind, rng)
        clean = sample_mod._to_uint8(surface)
        assert mask.dtype == bool and mask.any()
        assert np.array_equal(image[~mask], clean[~mask])
        diff = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
        assert diff[mask].mean() > 20, f"{kind} {k}: defect too faint ({diff[mask].mean():.1f} gray levels)"


def test_surfaces_vary_between_images(tmp_path):
    root = make_sample(tmp_path / "s", **SMALL)
    from PIL import Image

    goods = [np.asarray(Image.open(p)) for p in sorted((root / "brick/train/good").glob("*.png"))]
    assert goods[0].shape == (64, 64, 3)
    assert all(np.abs(goods[0].astype(int) - g).mean() > 10 for g in goods[1:])


def test_other_counts_keep_existing_images(tmp_path):
    a = files(make_sample(tmp_path / "a", **SMALL))
    b = files(make_sample(tmp_path / "b", **{**SMALL, "n_defect": 3}))
    assert all(b[k] == v for k, v in a.items() if k.endswith(".png"))
    assert len(b) > len(a)


def test_skips_when_args_match_and_rebuilds_when_not(tmp_path, monkeypatch):
    out = tmp_path / "s"
    make_sample(out, **SMALL)

    def boom(*a, **k):
        raise AssertionError("rebuilt although the arguments match")

    with monkeypatch.context() as m:
        m.setattr(sample_mod, "_build", boom)
        assert make_sample(out, **SMALL) == out

    make_sample(out, **{**SMALL, "n_defect": 1})
    assert json.loads((out / META_FILE).read_text())["args"]["n_defect"] == 1
    assert not (out / "brick/test/crack/001.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s"], "temporary folders left behind"


def test_failure_midway_leaves_old_sample_and_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "s"
    make_sample(out, **SMALL)
    before = files(out)
    calls = {"n": 0}
    real = sample_mod._defect_image

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a killed run
        return real(*a, **k)

    monkeypatch.setattr(sample_mod, "_defect_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        make_sample(out, **{**SMALL, "seed": 1})
    assert files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]

    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        make_sample(tmp_path / "new", **SMALL)
    assert not (tmp_path / "new").exists()


def test_refuses_to_replace_a_folder_that_is_not_a_sample(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "important.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine: exists and is not a defectforge sample"):
        make_sample(out, **SMALL)
    assert (out / "important.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"size": 16}, "size"),
        ({"size": 64.0}, "size"),
        ({"n_train_good": 0}, "n_train_good"),
        ({"n_test_good": -1}, "n_test_good"),
        ({"n_defect": 0}, "n_defect"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_args(tmp_path, bad, key):
    with pytest.raises(ParamsError, match=key):
        make_sample(tmp_path / "s", **{**SMALL, **bad})
    assert not (tmp_path / "s").exists()

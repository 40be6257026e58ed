"""Dataset adapters on small folders written by the tests (no real dataset needed)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.data.adapters import COLUMNS, LAYOUTS, ingest
from defectforge.errors import DataError, ParamsError

W, H = 24, 16  # tiny, non-square: catches width/height swaps


# --------------------------------------------------------------------------- writers


def write_image(path: Path, w: int = W, h: int = H, seed: int = 0, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_mask(path: Path, w: int = W, h: int = H, box=(2, 3, 7, 9), value: int = 255) -> Path:
    """A mask whose defect is the box (x0, y0, x1, y1); area (x1-x0)*(y1-y0)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = value
    Image.fromarray(m).save(path)
    return path


BOX_AREA = (7 - 2) * (9 - 3)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_mvtec(root: Path) -> Path:
    for i in range(3):
        write_image(root / "widget/train/good" / f"{i:03d}.png", seed=i)
    for i in range(2):
        write_image(root / "widget/test/good" / f"{i:03d}.png", seed=10 + i)
    for i in range(2):
        write_image(root / "widget/test/scratch" / f"{i:03d}.png", seed=20 + i)
        write_mask(root / "widget/ground_truth/scratch" / f"{i:03d}_mask.png")
    write_image(root / "gadget/train/good/000.png", seed=30)
    write_image(root / "gadget/test/dent/000.png", seed=31)
    write_mask(root / "gadget/ground_truth/dent/000_mask.png", box=(0, 0, 4, 4))
    return root


def make_folder(root: Path) -> Path:
    write_image(root / "plate/good/a.png", seed=1)
    write_image(root / "plate/good/b.png", seed=2)
    write_mask(root / "plate/good/b_mask.png")  # a mask in good/ is neither an image nor used
    write_image(root / "plate/rust/r1.png", seed=3)
    write_mask(root / "plate/rust/r1_mask.png")
    write_image(root / "plate/rust/r2.png", seed=4)
    write_mask(root / "plate/rust/r2_mask.png")
    return root


def make_magnetic_tile(root: Path) -> Path:
    for i in range(2):
        write_image(root / "MT_Blowhole/Imgs" / f"exp1_num_{i}.jpg", seed=i, fmt="JPEG")
        write_mask(root / "MT_Blowhole/Imgs" / f"exp1_num_{i}.png")
    write_image(root / "MT_Crack/Imgs/exp2_num_7.jpg", seed=5, fmt="JPEG")
    write_mask(root / "MT_Crack/Imgs/exp2_num_7.png")
    for i in range(3):
        write_image(root / "MT_Free/Imgs" / f"exp0_num_{i}.jpg", seed=9 + i, fmt="JPEG")
        write_mask(root / "MT_Free/Imgs" / f"exp0_num_{i}.png", value=0)  # all black, as in the dataset
    return root


# --------------------------------------------------------------------------- happy paths


def test_mvtec_rows_columns_ids_paths_and_hashes(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    df = ingest("mvtec", root)

    assert list(df.columns) == COLUMNS
    assert len(df) == 3 + 2 + 2 + 1 + 1
    assert df["image_id"].is_unique and df["image_id"].is_monotonic_increasing
    assert df.groupby(["category", "defect_type"]).size().to_dict() == {
        ("gadget", "dent"): 1,
        ("gadget", "good"): 1,
        ("widget", "good"): 5,
        ("widget", "scratch"): 2,
    }
    row = df.set_index("image_id")
    # train and test goods stay distinct
    assert row.loc["widget/good/train-000", "origin"] == "train"
    assert row.loc["widget/good/test-000", "origin"] == "test"
    assert row.loc["widget/good/train-000", "image_path"] == "widget/train/good/000.png"
    assert row.loc["widget/good/test-000", "mask_path"] is None
    assert row.loc["widget/good/test-000", "mask_sha256"] is None
    assert row.loc["widget/good/test-000", "mask_area"] == 0

    r = row.loc["widget/scratch/001"]
    assert r["image_path"] == "widget/test/scratch/001.png"
    assert r["mask_path"] == "widget/ground_truth/scratch/001_mask.png"
    assert r["image_sha256"] == sha(root / r["image_path"])
    assert r["mask_sha256"] == sha(root / r["mask_path"])
    assert (r["width"], r["height"]) == (W, H)
    assert r["mask_area"] == BOX_AREA
    assert row.loc["gadget/dent/000", "mask_area"] == 16
    assert set(df["origin"]) == {"train", "test"}
    for col in ("width", "height", "mask_area"):
        assert df[col].dtype == np.int64


def test_mvtec_single_category_root(tmp_path):
    root = make_mvtec(tmp_path / "mvtec")
    df = ingest("mvtec", root / "widget")
    assert set(df["category"]) == {"widget"}
    assert len(df) == 7
    assert "train/good/000.png" in set(df["image_path"])


def test_folder_default_rule_skips_mask_files(tmp_path):
    root = make_folder(tmp_path / "folder")
    df = ingest("folder", root)
    assert list(df.columns) == COLUMNS
    assert df["image_id"].tolist() == ["plate/good/a", "plate/good/b", "plate/rust/r1", "plate/rust/r2"]
    assert set(df["origin"]) == {"unspecified"}
    rust = df[df["defect_type"] == "rust"]
    assert rust["mask_path"].tolist() == ["plate/rust/r1_mask.png", "plate/rust/r2_mask.png"]
    assert (rust["mask_area"] == BOX_AREA).all()
    assert df.loc[df["defect_type"] == "good", "mask_path"].isna().all()


def test_folder_images_and_masks_subfolders(tmp_path):
    root = tmp_path / "own"
    for i in range(2):
        write_image(root / "board/solder/images" / f"{i}.jpg", seed=i, fmt="JPEG")
        write_mask(root / "board/solder/masks" / f"{i}.png")
    write_image(root / "board/good/images/g.jpg", fmt="JPEG")
    df = ingest("folder", root, image_glob="images/*", mask_rule="../masks/{stem}.png")
    assert len(df) == 3
    assert df.set_index("image_id").loc["board/solder/1", "mask_path"] == "board/solder/masks/1.png"
    assert df.set_index("image_id").loc["board/good/g", "image_path"] == "board/good/images/g.jpg"


def test_folder_single_category_root_named_after_folder(tmp_path):
    root = tmp_path / "cable"
    write_image(root / "good/x.png")
    write_image(root / "cut/y.png")
    write_mask(root / "cut/y_mask.png")
    df = ingest("folder", root)
    assert df["image_id"].tolist() == ["cable/cut/y", "cable/good/x"]


def test_magnetic_tile_layout(tmp_path):
    root = make_magnetic_tile(tmp_path / "mt")
    df = ingest("magnetic-tile", root)
    assert list(df.columns) == COLUMNS
    assert df.groupby("defect_type").size().to_dict() == {"blowhole": 2, "crack": 1, "good": 3}
    assert set(df["category"]) == {"magnetic-tile"}
    r = df.set_index("image_id").loc["magnetic-tile/blowhole/exp1_num_1"]
    assert r["image_path"] == "MT_Blowhole/Imgs/exp1_num_1.jpg"
    assert r["mask_path"] == "MT_Blowhole/Imgs/exp1_num_1.png"
    good = df[df["defect_type"] == "good"]
    assert good["mask_path"].isna().all() and (good["mask_area"] == 0).all()


def test_magnetic_tile_noisy_mask_is_thresholded(tmp_path):
    """Magnetic Tile's masks went through JPEG: not 0/255, values all over 0..255."""
    root = make_magnetic_tile(tmp_path / "mt")
    binary = np.zeros((H, W), np.uint8)
    binary[4:12, 5:15] = 255
    buf = io.BytesIO()
    Image.fromarray(binary).save(buf, format="JPEG", quality=30)
    noisy = np.asarray(Image.open(buf).convert("L"))
    Image.fromarray(noisy).save(root / "MT_Crack/Imgs/exp2_num_7.png")
    assert len(np.unique(noisy)) > 4, "the test mask must really be noisy"
    assert np.count_nonzero(noisy) > np.count_nonzero(noisy >= 128)

    df = ingest("magnetic-tile", root).set_index("image_id")
    assert df.loc["magnetic-tile/crack/exp2_num_7", "mask_area"] == np.count_nonzero(noisy >= 128)
    df200 = ingest("magnetic-tile", root, mask_threshold=200).set_index("image_id")
    assert df200.loc["magnetic-tile/crack/exp2_num_7", "mask_area"] == np.count_nonzero(noisy >= 200)


def test_image_glob_filters(tmp_path):
    root = make_magnetic_tile(tmp_path / "mt")
    df = ingest("magnetic-tile", root, image_glob="exp1_*")
    assert df["defect_type"].tolist() == ["blowhole", "blowhole"]


# --------------------------------------------------------------------------- bad input


def test_unknown_layout_names_the_allowed_ones(tmp_path):
    with pytest.raises(DataError, match="unknown layout 'visa'") as exc:
        ingest("visa", tmp_path)
    for name in LAYOUTS:
        assert name in str(exc.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_root(tmp_path, layout):
    with pytest.raises(DataError, match=r"nowhere: dataset root not found"):
        ingest(layout, tmp_path / "nowhere")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_empty_dataset_folder(tmp_path, layout):
    (tmp_path / "empty" / "something").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty: no images found"):
        ingest(layout, tmp_path / "empty")


def _defect_paths(layout: str, root: Path) -> tuple[Path, Path]:
    """(image, mask) of one defect image in each test layout."""
    return {
        "mvtec": (root / "widget/test/scratch/001.png", root / "widget/ground_truth/scratch/001_mask.png"),
        "folder": (root / "plate/rust/r2.png", root / "plate/rust/r2_mask.png"),
        "magnetic-tile": (root / "MT_Blowhole/Imgs/exp1_num_1.jpg", root / "MT_Blowhole/Imgs/exp1_num_1.png"),
    }[layout]


MAKERS = {"mvtec": make_mvtec, "folder": make_folder, "magnetic-tile": make_magnetic_tile}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_corrupt_image(tmp_path, layout):
    root = MAKERS[layout](tmp_path / "d")
    image, _ = _defect_paths(layout, root)
    image.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match="unreadable or corrupt image") as exc:
        ingest(layout, root)
    assert str(image) in str(exc.value)


def test_truncated_image(tmp_path):
    root = make_mvtec(tmp_path / "d")
    image = root / "widget/train/good/001.png"
    write_image(image, w=200, h=200)  # big enough that half the bytes lose pixel data
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="unreadable or corrupt image") as exc:
        ingest("mvtec", root)
    assert str(image) in str(exc.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_corrupt_mask(tmp_path, layout):
    root = MAKERS[layout](tmp_path / "d")
    _, mask = _defect_paths(layout, root)
    mask.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="unreadable or corrupt mask") as exc:
        ingest(layout, root)
    assert str(mask) in str(exc.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_of_another_size(tmp_path, layout):
    root = MAKERS[layout](tmp_path / "d")
    image, mask = _defect_paths(layout, root)
    write_mask(mask, w=W + 1, h=H)
    with pytest.raises(DataError, match=f"mask is {W + 1}x{H} but its image .* is {W}x{H}") as exc:
        ingest(layout, root)
    assert str(mask) in str(exc.value) and str(image) in str(exc.value)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("value", [0, 100])  # all black, and all below the threshold
def test_empty_mask(tmp_path, layout, value):
    root = MAKERS[layout](tmp_path / "d")
    _, mask = _defect_paths(layout, root)
    write_mask(mask, value=value)
    with pytest.raises(DataError, match="empty mask") as exc:
        ingest(layout, root)
    assert str(mask) in str(exc.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_mask(tmp_path, layout):
    root = MAKERS[layout](tmp_path / "d")
    image, mask = _defect_paths(layout, root)
    mask.unlink()
    with pytest.raises(DataError, match="no mask for this defect image") as exc:
        ingest(layout, root)
    assert str(image) in str(exc.value) and str(mask) in str(exc.value)


def test_good_images_need_no_mask(tmp_path):
    root = make_magnetic_tile(tmp_path / "mt")
    for m in (root / "MT_Free/Imgs").glob("*.png"):
        m.unlink()
    assert (ingest("magnetic-tile", root)["defect_type"] == "good").sum() == 3


def test_mask_rule_escaping_root(tmp_path):
    root = make_folder(tmp_path / "d")
    write_mask(tmp_path / "outside" / "r1.png")
    write_mask(tmp_path / "outside" / "r2.png")
    with pytest.raises(DataError, match="escapes the dataset root"):
        ingest("folder", root, mask_rule="../../../outside/{stem}.png")


def test_mask_rule_onto_itself_and_bad_pattern(tmp_path):
    root = make_folder(tmp_path / "d")
    with pytest.raises(DataError, match="onto itself"):
        ingest("folder", root, mask_rule="{name}")
    with pytest.raises(ParamsError, match="mask_rule"):
        ingest("folder", root, mask_rule="{nope}.png")


def test_duplicate_ids_name_both_files(tmp_path):
    root = make_folder(tmp_path / "d")
    write_image(root / "plate/good/a.jpg", fmt="JPEG")
    with pytest.raises(DataError, match="already used by") as exc:
        ingest("folder", root)
    assert "a.jpg" in str(exc.value) and "a.png" in str(exc.value)


@pytest.mark.parametrize("threshold", [0, 256, 1.5, True])
def test_bad_threshold(tmp_path, threshold):
    root = make_folder(tmp_path / "d")
    with pytest.raises(ParamsError, match="mask_threshold"):
        ingest("folder", root, mask_threshold=threshold)

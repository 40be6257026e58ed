"""Ingest against hostile or messy data (issue 10): symlinks out of the root, 16-bit images,
every bad sample reported in one pass (data.on_bad fail | skip + the quarantine file),
image_glob out of the class folder, --out that is not ours, the progress bar's line."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.data.adapters import BadSamplesError, ingest
from defectforge.data.codec import read_image, read_mask
from defectforge.errors import DataError, ParamsError

from test_adapters import make_folder, make_magnetic_tile, write_image, write_mask

from cli_helpers import run_cli


_cli = run_cli


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if "error: " in line]


# --------------------------------------------------------------------------- symlinks


def test_symlinked_image_escaping_the_root_is_refused(tmp_path):
    root = make_folder(tmp_path / "d")
    outside = write_image(tmp_path / "secret" / "r2.png", seed=7)
    target = root / "plate/rust/r2.png"
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(DataError, match="escapes the dataset root") as exc:
        ingest("folder", root)
    assert str(target) in str(exc.value)


def test_symlink_inside_the_root_is_fine(tmp_path):
    root = make_folder(tmp_path / "d")
    target = root / "plate/good/a.png"
    kept = root / "originals" / "a-original.png"
    kept.parent.mkdir()
    os.replace(target, kept)
    target.symlink_to(kept)
    df = ingest("folder", root)
    assert df.set_index("image_id").loc["plate/good/a", "image_path"] == "plate/good/a.png"


def test_symlinked_class_folder_escaping_the_root_cli_one_line(tmp_path):
    root = make_magnetic_tile(tmp_path / "mt")
    elsewhere = tmp_path / "elsewhere" / "MT_Blowhole"
    os.replace(root / "MT_Blowhole", elsewhere.parent.mkdir(parents=True) or elsewhere)
    (root / "MT_Blowhole").symlink_to(elsewhere, target_is_directory=True)
    out = tmp_path / "m" / "source.parquet"
    r = _cli("ingest", "--layout", "magnetic-tile", "--root", root, "--out", out, "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert line.startswith(f"error: {root / 'MT_Blowhole'}") and "escapes the dataset root" in line
    assert not out.exists() and not (out.parent / "source.quarantine.json").exists()


# --------------------------------------------------------------------------- 16-bit


def _gradient16(h: int = 32, w: int = 64) -> np.ndarray:
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def test_16bit_greyscale_png_is_scaled_not_clipped(tmp_path):
    a = _gradient16()
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode in ("I;16", "I")
    img = read_image(path)
    assert img.dtype == np.uint8 and img.shape == (32, 64, 3)
    assert (img[..., 0] == img[..., 1]).all() and (img[..., 0] == img[..., 2]).all()
    expected = np.rint(a.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.abs(img[..., 0].astype(int) - expected).max() <= 1
    assert img.min() == 0 and img.max() == 255
    assert 120 < img.mean() < 135  # clipped, it was ~254 (99 % white)
    assert (img == 255).mean() < 0.01


def test_16bit_tiff_and_32bit_int_image(tmp_path):
    a = _gradient16()
    Image.fromarray(a).save(tmp_path / "deep.tif")
    Image.fromarray(a.astype(np.int32)).save(tmp_path / "int32.tif")
    for name in ("deep.tif", "int32.tif"):
        img = read_image(tmp_path / name)
        assert 120 < img.mean() < 135, name
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "huge.tif")
    with pytest.raises(DataError, match="huge.tif"):
        read_image(tmp_path / "huge.tif")


def test_16bit_mask_is_thresholded_on_the_8bit_scale(tmp_path):
    m = np.zeros((16, 24), np.uint16)
    m[2:6, 2:6] = 60000  # -> 233: defect
    m[10:14, 10:14] = 20000  # -> 78: below 128, not defect (clipped it read as 255)
    path = tmp_path / "mask16.png"
    Image.fromarray(m).save(path)
    mask = read_mask(path, threshold=128)
    assert mask.sum() == 16 and mask[2:6, 2:6].all() and not mask[10:14, 10:14].any()


def test_ingest_reads_16bit_masks_at_their_depth(tmp_path):
    root = make_folder(tmp_path / "d")
    m = np.zeros((16, 24), np.uint16)
    m[0:3, 0:4] = 65535
    m[8:16, 8:24] = 30000  # 117 < 128
    Image.fromarray(m).save(root / "plate/rust/r1_mask.png")
    df = ingest("folder", root)
    assert int(df.set_index("image_id").loc["plate/rust/r1", "mask_area"]) == 12


# --------------------------------------------------------------------------- bad samples, one pass


def _many_bad(root: Path) -> dict[str, str]:
    """A folder dataset with one sample of each kind of bad; returns image_id -> reason."""
    make_folder(root)
    for i in range(4):
        write_image(root / f"plate/dent/d{i}.png", seed=40 + i)
        write_mask(root / f"plate/dent/d{i}_mask.png")
    (root / "plate/dent/d0.png").write_bytes(b"not an image at all")
    write_mask(root / "plate/dent/d1_mask.png", value=0)
    (root / "plate/dent/d2_mask.png").unlink()
    write_mask(root / "plate/dent/d3_mask.png", w=10, h=10)
    return {
        "plate/dent/d0": "unreadable image",
        "plate/dent/d1": "empty mask",
        "plate/dent/d2": "missing mask",
        "plate/dent/d3": "size mismatch",
    }


def test_every_bad_sample_is_reported_in_one_pass(tmp_path):
    root = tmp_path / "d"
    expected = _many_bad(root)
    with pytest.raises(BadSamplesError) as exc:
        ingest("folder", root)
    got = {b.image_id: b.reason for b in exc.value.bad}
    assert got == expected
    assert str(exc.value).startswith(f"{root}: 4 of ")
    df = ingest("folder", root, on_bad="skip")
    assert not set(expected) & set(df.image_id)
    assert [b.image_id for b in df.attrs["bad"]] == sorted(expected)
    assert df.attrs["checked"] == len(df) + 4


def test_cli_on_bad_fail_lists_all_and_writes_no_manifest(tmp_path):
    root = tmp_path / "d"
    expected = _many_bad(root)
    out = tmp_path / "m" / "source.parquet"
    r = _cli("ingest", "--layout", "folder", "--root", root, "--out", out, "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    first = _error_lines(r.stderr)
    assert len(first) == 1 and lines.index(first[0]) == len(lines) - 5  # summary, then the 4 files
    quarantine = out.parent / "source.quarantine.json"
    assert first[0].startswith(f"error: {root}: 4 of ") and str(quarantine) in first[0]
    for image_id in expected:
        stem = image_id.rsplit("/", 1)[1]
        assert sum(stem in line for line in lines[-4:]) == 1
    assert not out.exists()
    q = json.loads(quarantine.read_text())
    assert {s["image_id"]: s["reason"] for s in q["samples"]} == expected
    assert q["manifest_written"] is False and q["on_bad"] == "fail" and q["bad"] == 4


def test_cli_on_bad_skip_writes_manifest_and_quarantine(tmp_path):
    from defectforge.manifest.io import read_manifest

    root = tmp_path / "d"
    expected = _many_bad(root)
    out = tmp_path / "m" / "source.parquet"
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  layout: folder\n  on_bad: skip\n")
    r = _cli("ingest", "--root", root, "--out", out, "--params", params)
    assert r.returncode == 0, r.stderr
    ids = set(read_manifest(out).to_pandas().image_id)
    assert ids and not ids & set(expected)
    q = json.loads((out.parent / "source.quarantine.json").read_text())
    assert q["format"] == "defectforge-quarantine/1" and q["on_bad"] == "skip" and q["manifest_written"] is True
    assert q["quarantined"] == 4 and q["kept"] == len(ids) and q["checked"] == len(ids) + 4
    assert q["by_reason"] == {r: 1 for r in expected.values()}
    sample = {s["image_id"]: s for s in q["samples"]}
    assert sample["plate/dent/d1"]["image_path"] == "plate/dent/d1.png"
    assert sample["plate/dent/d1"]["mask_path"] == "plate/dent/d1_mask.png"
    assert (out.parent / q["dataset_root"]).resolve() == root.resolve()


def test_clean_run_writes_an_empty_quarantine(tmp_path):
    root = make_folder(tmp_path / "d")
    out = tmp_path / "source.parquet"
    assert _cli("ingest", "--layout", "folder", "--root", root, "--out", out, "--params", tmp_path / "none.yaml").returncode == 0
    q = json.loads((tmp_path / "source.quarantine.json").read_text())
    assert q["samples"] == [] and q["quarantined"] == 0


def test_bad_samples_in_filtered_out_categories_do_not_stop_ingest(tmp_path):
    root = tmp_path / "d"
    _many_bad(root)
    write_image(root / "other/good/x.png")
    write_image(root / "other/dent/y.png")
    write_mask(root / "other/dent/y_mask.png")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  layout: folder\n  categories: [other]\n")
    r = _cli("ingest", "--root", root, "--out", tmp_path / "s.parquet", "--params", params)
    assert r.returncode == 0, r.stderr


def test_error_starts_its_own_line_after_the_progress_bar(tmp_path):
    root = tmp_path / "d"
    _many_bad(root)
    r = _cli("ingest", "--layout", "folder", "--root", root, "--out", tmp_path / "s.parquet", "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    assert "ingest folder" in r.stderr  # the bar was drawn
    (line,) = _error_lines(r.stderr.replace("\r", "\n"))
    assert line.startswith("error: ")
    assert any(raw.startswith("error: ") for raw in r.stderr.split("\n")), r.stderr


# --------------------------------------------------------------------------- image_glob


@pytest.mark.parametrize("glob", ["/etc/*", "../*", "../../*", "images/../../*"])
def test_image_glob_out_of_the_class_folder(tmp_path, glob):
    root = make_folder(tmp_path / "d")
    with pytest.raises(ParamsError, match="image_glob"):
        ingest("folder", root, image_glob=glob)
    r = _cli("ingest", "--layout", "folder", "--root", root, "--image-glob", glob, "--out", tmp_path / "s.parquet",
             "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert "data.image_glob" in line and "duplicate" not in line and "already used" not in line
    assert not (tmp_path / "s.parquet").exists()


# --------------------------------------------------------------------------- --out


def test_out_that_is_a_foreign_file_is_not_overwritten(tmp_path):
    root = make_folder(tmp_path / "d")
    thesis = tmp_path / "thesis.parquet"
    thesis.write_text("my thesis")
    r = _cli("ingest", "--layout", "folder", "--root", root, "--out", thesis, "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert str(thesis) in line and "not a defectforge manifest" in line
    assert thesis.read_text() == "my thesis"
    assert not (tmp_path / "thesis.quarantine.json").exists()


def test_out_that_is_a_non_empty_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "d")
    folder = tmp_path / "mydocs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "notes.txt").write_text("keep me")
    r = _cli("ingest", "--layout", "folder", "--root", root, "--out", folder, "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert line.startswith(f"error: {folder}: ")
    assert (folder / "sub" / "notes.txt").read_text() == "keep me" and len(list(folder.rglob("*"))) == 2


def test_our_own_manifest_is_replaced_and_a_foreign_quarantine_file_is_not(tmp_path):
    root = make_folder(tmp_path / "d")
    out = tmp_path / "source.parquet"
    args = ("ingest", "--layout", "folder", "--root", root, "--out", out, "--params", tmp_path / "none.yaml")
    assert _cli(*args).returncode == 0
    assert _cli(*args).returncode == 0  # a rerun replaces what defectforge wrote
    q = tmp_path / "source.quarantine.json"
    q.write_text('{"mine": true}')
    r = _cli(*args)
    assert r.returncode == 2 and str(q) in _error_lines(r.stderr)[0]
    assert q.read_text() == '{"mine": true}'


# --------------------------------------------------------------------------- validate


def test_validate_on_an_unknown_kind_names_the_file(tmp_path):
    import pyarrow.parquet as pq

    root = make_folder(tmp_path / "d")
    out = tmp_path / "source.parquet"
    assert _cli("ingest", "--layout", "folder", "--root", root, "--out", out, "--params", tmp_path / "none.yaml").returncode == 0
    table = pq.read_table(out)
    meta = {k: (b"evil" if k == b"defectforge.kind" else v) for k, v in table.schema.metadata.items()}
    evil = tmp_path / "evil.parquet"
    pq.write_table(table.replace_schema_metadata(meta), evil)
    r = _cli("validate", evil)
    assert r.returncode == 2
    (line,) = _error_lines(r.stderr)
    assert line.startswith(f"error: {evil}: ") and "'evil'" in line

"""Files ingest cannot use are listed with their reason, never dropped without a word: an image
that is a FIFO or a link to a device, a mask name taken by a folder or FIFO, an id with a
control character, an image over PIL's decompression-bomb limit."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from PIL import Image

from defectforge.data.adapters import BadSamplesError, ingest
from defectforge.data.codec import read_image
from defectforge.errors import DataError

from test_adapters import make_folder, write_image

from cli_helpers import run_cli


def _skip_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  layout: folder\n  on_bad: skip\n")
    return params


@pytest.mark.parametrize("kind", ["fifo", "devnull"])
def test_image_that_is_no_file_is_quarantined_not_dropped(tmp_path, kind):
    root = make_folder(tmp_path / "d")
    odd = root / "plate/good/c.png"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to("/dev/null")
    df = ingest("folder", root, on_bad="skip")
    (bad,) = df.attrs["bad"]
    assert bad.image_id == "plate/good/c" and bad.reason == "not a regular file"
    assert ("FIFO" if kind == "fifo" else "character device") in bad.detail and str(odd) in bad.detail
    assert df.attrs["checked"] == len(df) + 1

    out = tmp_path / "m" / "source.parquet"
    r = run_cli("ingest", "--root", root, "--out", out, "--params", _skip_params(tmp_path))
    assert r.returncode == 0, r.stderr
    q = json.loads((out.parent / "source.quarantine.json").read_text())
    assert q["bad"] == 1 and q["by_reason"] == {"not a regular file": 1}
    assert q["samples"][0]["image_path"] == "plate/good/c.png"

    with pytest.raises(BadSamplesError, match="1 of .* not a regular file"):
        ingest("folder", root, on_bad="fail")


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_mask_name_taken_by_no_file_says_what_is_there(tmp_path, kind):
    root = make_folder(tmp_path / "d")
    mask = root / "plate/rust/r1_mask.png"
    mask.unlink()
    if kind == "folder":
        mask.mkdir()
    else:
        os.mkfifo(mask)
    with pytest.raises(BadSamplesError) as exc:
        ingest("folder", root)
    (bad,) = exc.value.bad
    assert bad.reason == "not a regular file" and bad.mask_path == "plate/rust/r1_mask.png"
    assert ("a folder" if kind == "folder" else "a FIFO") in bad.detail and "no mask" not in bad.detail


def test_image_id_with_a_control_character_is_refused_in_one_line(tmp_path):
    root = make_folder(tmp_path / "d")
    write_image(root / "plate/good/x\ny.png", seed=5)
    with pytest.raises(DataError, match="control character") as exc:
        ingest("folder", root, on_bad="skip")
    assert "\n" not in str(exc.value)


def test_image_over_the_pixel_limit_is_one_line_naming_file_and_pixels(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "d")  # 24x16 images and masks: 384 pixels
    big = write_image(root / "plate/good/a.png", w=48, h=32, seed=1)  # 1,536 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over the limit, under twice it: PIL only warns
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # PIL's raw warning would be recorded here
        with pytest.raises(DataError, match="1,536 pixels") as exc:
            read_image(big)
        assert str(big) in str(exc.value) and "downscale" in str(exc.value)
        df = ingest("folder", root, on_bad="skip")
    assert not [w for w in shown if issubclass(w.category, Image.DecompressionBombWarning)]
    (bad,) = df.attrs["bad"]
    assert bad.reason == "image too large" and bad.image_id == "plate/good/a"
    assert "1,536 pixels" in bad.detail and "1,000" in bad.detail

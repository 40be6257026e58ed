"""Files are read as they are displayed: EXIF orientation applied to images and masks alike, and
palette masks read by index (0 = background), never by the brightness of the index's colour."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from defectforge.data.codec import image_size, read_image, read_mask


def _exif(orientation: int) -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    return e.tobytes()


def _displayed():
    """An image with a bright patch top-left and its mask, as a person sees and draws them."""
    img = np.full((20, 30, 3), 40, np.uint8)
    img[2:6, 3:10] = 230
    mask = np.zeros((20, 30), bool)
    mask[2:6, 3:10] = True
    return img, mask


@pytest.mark.parametrize("orientation,turn", [(3, Image.Transpose.ROTATE_180), (6, Image.Transpose.ROTATE_90),
                                              (8, Image.Transpose.ROTATE_270), (2, Image.Transpose.FLIP_LEFT_RIGHT)])
def test_an_image_stored_turned_with_its_orientation_tag_is_read_as_displayed(tmp_path, orientation, turn):
    img, mask = _displayed()
    # the camera stores the sensor's rows and a tag saying how to show them: stored = displayed turned back
    stored = Image.fromarray(img).transpose(turn)
    stored.save(tmp_path / "img.png", exif=_exif(orientation))
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")  # drawn on the displayed image
    got = read_image(tmp_path / "img.png")
    assert got.shape == img.shape and image_size(tmp_path / "img.png") == (30, 20)
    assert np.array_equal(got, img)
    assert np.array_equal(read_mask(tmp_path / "mask.png"), mask)  # the mask lies on the defect
    # a mask stored turned with the same tag is turned the same way
    Image.fromarray(mask.astype(np.uint8) * 255).transpose(turn).save(tmp_path / "mask_tagged.png", exif=_exif(orientation))
    assert np.array_equal(read_mask(tmp_path / "mask_tagged.png"), mask)


def test_a_palette_mask_is_read_by_index_whatever_the_colour(tmp_path):
    idx = np.zeros((16, 16), np.uint8)
    idx[4:8, 4:10] = 1  # class 1: dark red in a VOC palette, grey value about 38
    idx[10:12, 2:4] = 2
    pm = Image.fromarray(idx, mode="P")
    pm.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    pm.save(tmp_path / "voc.png")
    got = read_mask(tmp_path / "voc.png")
    assert np.array_equal(got, idx != 0)
    # a palette whose index 0 is bright is still background
    pm.putpalette([255, 255, 255, 128, 0, 0, 0, 128, 0] + [0] * (253 * 3))
    pm.save(tmp_path / "bright0.png")
    assert np.array_equal(read_mask(tmp_path / "bright0.png"), idx != 0)
    # a palette image read as an image keeps its colours
    assert tuple(read_image(tmp_path / "voc.png")[5, 5]) == (128, 0, 0)

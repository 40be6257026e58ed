"""Eq. 13 refinement, crops and paste-back, trimap / foreground estimate."""

from __future__ import annotations

import numpy as np
import pytest

from defectforge.errors import DataError
from defectforge.masks.crop import crop_box, extract, paste
from defectforge.masks.refine import refine_mask
from defectforge.masks.trimap import BACKGROUND, DEFECT, OBJECT, estimate_foreground, make_trimap


def test_refined_mask_is_inside_the_target_and_follows_attention():
    rng = np.random.default_rng(0)
    target = np.zeros((64, 64), bool)
    target[16:48, 16:48] = True
    att = rng.uniform(0, 0.4, (64, 64)).astype(np.float32)
    att[20:40, 24:44] = 0.8  # the defect tokens win here
    att[0:10, 0:10] = 0.9  # strong attention outside the target must be ignored
    refined = refine_mask(att, target)
    assert not (refined & ~target).any()
    assert refined[22:38, 26:42].all()  # core of the attended region kept
    assert refined.sum() < target.sum()  # background part of the target dropped
    assert not refined[16:19, 16:48].any()


def test_refine_threshold_and_morphology():
    target = np.ones((20, 20), bool)
    att = np.zeros((20, 20), np.float32)
    att[5:15, 5:15] = 0.5  # exactly 1/2 counts (Eq. 13 uses >=)
    att[1, 1] = 0.9  # a lone pixel: removed by the opening
    assert refine_mask(att, target, radius=0)[1, 1]
    out = refine_mask(att, target, radius=1)
    assert not out[1, 1] and out[6:14, 6:14].all()
    with pytest.raises(DataError):
        refine_mask(att[:10], target)


def test_crop_paste_leaves_outside_the_box_untouched():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    mask = np.zeros((120, 200), bool)
    mask[5:15, 190:198] = True  # near a corner: the box shifts inside the image
    box = crop_box(mask, 64)
    assert (box.height, box.width) == (64, 64) and box.left + 64 <= 200 and box.top >= 0
    crop, cmask = extract(img, mask, box, 64)
    assert cmask.sum() == mask.sum()
    out = paste(img, 255 - crop, box)
    outside = np.ones((120, 200), bool)
    outside[box.slices()] = False
    assert np.array_equal(out[outside], img[outside])
    big = np.zeros((120, 200), bool)
    big[10:110, 20:150] = True  # bigger than the model: the box grows (then is resized)
    b2 = crop_box(big, 64)
    assert b2.height == 120 and b2.width >= 130
    with pytest.raises(DataError):
        crop_box(np.zeros((8, 8), bool), 64)


def test_foreground_of_an_object_on_a_plain_background_and_of_a_texture():
    img = np.full((80, 80, 3), 30, np.uint8)
    yy, xx = np.mgrid[0:80, 0:80]
    disc = (yy - 40) ** 2 + (xx - 40) ** 2 < 25**2
    img[disc] = 200
    img[38:42, 38:42] = 30  # a dark hole inside the object stays object (holes filled)
    fg = estimate_foreground(img)
    assert fg[40, 40] and fg[disc].mean() > 0.95 and fg[~disc].mean() < 0.05
    texture = np.random.default_rng(2).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    assert estimate_foreground(texture).all()


def test_trimap_puts_the_defect_on_the_object_only():
    img = np.full((80, 80, 3), 30, np.uint8)
    img[20:60, 20:60] = 200
    mask = np.zeros((80, 80), bool)
    mask[10:30, 10:30] = True  # half on the background
    tri = make_trimap(img, mask)
    assert set(np.unique(tri)) == {BACKGROUND, OBJECT, DEFECT}
    # the object's estimated outline is blurred by a few pixels at its corner (sigma = 2)
    assert 90 <= (tri == DEFECT).sum() <= 100 and not (tri[10:20, 10:20] == DEFECT).any()
    assert ((tri == DEFECT) <= mask).all()


def test_difference_mask_marks_what_was_painted():
    from defectforge.masks.refine import difference_mask

    normal = np.full((32, 32, 3), 120, np.uint8)
    target = np.zeros((32, 32), bool)
    target[8:24, 8:24] = True
    gen = normal.copy()
    gen[10:20, 12:18] = 30  # a dark stroke inside the target
    gen[0:4, 0:4] = 0  # a change outside the target is ignored
    out = difference_mask(normal, gen, target)
    assert out[11:19, 13:17].all() and not (out & ~target).any() and out.sum() <= 60
    assert not difference_mask(normal, normal, target).any()  # nothing painted -> empty

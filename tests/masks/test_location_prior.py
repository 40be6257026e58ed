"""Target masks placed by a location prior, and the mask-distribution distances that judge them."""

from __future__ import annotations

import numpy as np
import pytest

from defectforge.masks.target import LocationPrior, relative_position, sample_target_mask
from defectforge.metrics.mask_shapes import elongation, mask_distances, mask_features

H, W = 80, 120


def _disc(cy, cx, r=4):
    yy, xx = np.mgrid[0:H, 0:W]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _edge_masks(rng, n=12):
    """'Fray' defects: small discs on the left or right edge of a frame-filling part."""
    return [_disc(int(rng.integers(10, H - 10)), int(rng.choice([5, W - 6]))) for _ in range(n)]


def test_relative_position_and_elongation():
    fg = np.zeros((H, W), bool)
    fg[10:71, 20:101] = True  # object box: y 10..70, x 20..100
    assert relative_position(_disc(10, 20, 2), fg) == pytest.approx((0.0, 0.0), abs=1e-6)
    assert relative_position(_disc(40, 60, 3), fg) == pytest.approx((0.5, 0.5), abs=1e-6)
    assert relative_position(_disc(70, 100, 2), fg) == pytest.approx((1.0, 1.0), abs=1e-6)
    assert elongation(_disc(40, 60, 8)) < 0.05
    line = np.zeros((H, W), bool)
    line[40, 10:110] = True
    assert elongation(line) > 0.95


def test_mask_distances_are_zero_for_the_same_set_and_track_a_shift():
    rng = np.random.default_rng(0)
    a = [mask_features(_disc(int(rng.integers(10, 70)), int(rng.integers(10, 50)))) for _ in range(20)]
    d0 = mask_distances(a, a)
    assert d0["area"] == 0 and d0["elongation"] == 0 and d0["position"] == 0
    shifted = [dict(f, rel_x=f["rel_x"] + 0.3) for f in a]  # 0.3 box-widths to the right, edge distance kept
    assert mask_distances(a, shifted)["position"] == pytest.approx(0.3 / 3)  # mean of W(rel_y)=0, W(rel_x)=0.3, W(edge)=0
    assert mask_distances(a, [dict(f, area=f["area"] + 1.0) for f in a])["area"] == pytest.approx(1.0)


def test_prior_puts_edge_defects_on_the_edges_and_beats_foreground_placement():
    rng = np.random.default_rng(1)
    train, held_out = _edge_masks(rng, 40), _edge_masks(rng, 40)
    normal = np.full((H, W, 3), 128, np.uint8)  # a part filling the frame: the object box is the image
    prior = LocationPrior.fit(train, [normal] * len(train))
    real = [mask_features(m, image=normal) for m in held_out]
    out = {}
    for placement in ["foreground", "prior"]:
        r = np.random.default_rng(2)
        masks = [sample_target_mask(train, normal, r, placement=placement, prior=prior)[0] for _ in range(40)]
        out[placement] = mask_distances([mask_features(m, image=normal) for m in masks], real)
        if placement == "prior":
            edge = [mask_features(m, image=normal)["edge"] for m in masks]
            assert np.median(edge) < 0.1
    assert out["prior"]["position"] < 0.5 * out["foreground"]["position"]
    assert out["prior"]["area"] == pytest.approx(out["foreground"]["area"], abs=0.3)  # the shapes are the same kind


def test_prior_sampling_is_seeded_and_stays_in_the_box():
    prior = LocationPrior(np.array([[0.0, 0.0], [1.0, 1.0]]), bandwidth=0.3)
    draws = [prior.sample(np.random.default_rng(s)) for s in range(50)]
    assert all(0 <= y <= 1 and 0 <= x <= 1 for y, x in draws)
    assert prior.sample(np.random.default_rng(7)) == prior.sample(np.random.default_rng(7))
    with pytest.raises(ValueError, match="prior"):
        sample_target_mask([_disc(40, 60)], np.zeros((H, W, 3), np.uint8), np.random.default_rng(0), placement="prior")

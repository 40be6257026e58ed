"""Realism scores on constructed cases with known answers (no real data, no weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectforge.errors import DataError
from defectforge.metrics.realism import (
    SATURATION_HIGH,
    SATURATION_LOW,
    c2st_accuracy,
    defect_stats,
    intensity_distance,
    pooled_saturation,
)


def _square(side=32, lo=12, hi=20):
    mask = np.zeros((side, side), bool)
    mask[lo:hi, lo:hi] = True
    return mask


def _soft_blob(rng, depth=40.0, noise=6.0, radius=7.0, size=48, base=120.0):
    """A soft grey oval (Gaussian profile) on a noisy grey surface, and its mask."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.normal(0, 2), size / 2 + rng.normal(0, 2)
    prof = np.exp(-(((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * 1.3)) ** 2))
    g = base + rng.normal(0, noise, (size, size)) - depth * prof
    img = np.repeat(np.clip(np.rint(g), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return img, prof > 0.3


def test_saturated_share_is_exactly_k_over_n():
    img = np.full((32, 32, 3), 128, np.uint8)
    mask = _square()  # 64 px
    ys, xs = np.nonzero(mask)
    # 5 pixels at the ends of the range, one channel each; boundary values count, inner ones do not
    img[ys[0], xs[0], 0] = SATURATION_LOW
    img[ys[1], xs[1], 1] = SATURATION_HIGH
    img[ys[2], xs[2]] = 0
    img[ys[3], xs[3], 2] = 255
    img[ys[4], xs[4]] = (255, 0, 128)
    img[ys[5], xs[5]] = SATURATION_LOW + 1  # not saturated
    img[ys[6], xs[6]] = SATURATION_HIGH - 1  # not saturated
    img[0, 0] = 0  # outside the mask: ignored
    s = defect_stats(img, mask)
    assert s["saturated_share"] == 5 / 64 and s["saturated_px"] == 5 and s["mask_px"] == 64
    # pooled over pixels (not the mean of per-sample shares): 5 of 64 + 128 in-mask pixels
    big = np.zeros((32, 32), bool)
    big[:8, :16] = True  # 128 px, none saturated
    assert pooled_saturation([s, defect_stats(np.full((32, 32, 3), 128, np.uint8), big)]) == 5 / 192


def test_contrast_ring_and_chroma_have_their_known_values():
    img = np.full((32, 32, 3), 120, np.uint8)
    mask = _square()
    img[mask] = 80
    near = np.zeros((32, 32), bool)
    near[8:24, 8:24] = True  # every pixel within 4 px of the mask (any metric) is 100, farther ones 120
    img[near & ~mask] = 100
    s = defect_stats(img, mask, ring=4)
    assert s["in_mask_mean"] == 80 and s["in_mask_std"] == 0 and s["ring_mean"] == 100
    assert s["contrast"] == -20  # dark defect: negative
    bright = img.copy()
    bright[mask] = 200
    assert defect_stats(bright, mask)["contrast"] > 0
    # chroma: mean (max - min) over channels inside the mask; ring and source separately
    col = np.full((32, 32, 3), 120, np.uint8)
    col[mask] = (200, 80, 80)
    ref = np.full((32, 32, 3), 120, np.uint8)
    ref[..., 0] = 130
    s = defect_stats(col, mask, reference=ref)
    assert s["chroma"] == 120 and s["chroma_ring"] == 0 and s["chroma_source"] == 10
    assert s["in_mask_mean"] == pytest.approx(120)


def test_edge_sharpness_is_higher_for_a_hard_rim_than_a_soft_edge():
    rng = np.random.default_rng(0)
    hard_img, mask = _soft_blob(rng, depth=0)
    hard = hard_img.copy()
    hard[mask] = 60  # a plateau with a step at the mask boundary
    soft, _ = _soft_blob(np.random.default_rng(0), depth=60)
    e_hard, e_soft = defect_stats(hard, mask)["edge_sharpness"], defect_stats(soft, mask)["edge_sharpness"]
    assert e_hard > 2 * e_soft
    # a step of height C on a flat surface: Sobel |grad| = C/2 on both sides of the edge, floor 1 below
    flat = np.full((32, 32, 3), 100, np.uint8)
    m = np.zeros((32, 32), bool)
    m[:, :16] = True
    flat[m] = 60
    assert defect_stats(flat, m)["edge_sharpness"] == pytest.approx(20.0)
    # the same step on a rough surface stands out less against the surface's own edges
    rough = np.clip(flat.astype(float) + np.random.default_rng(1).normal(0, 12, (32, 32, 1)), 0, 255).astype(np.uint8)
    assert defect_stats(rough, m)["edge_sharpness"] < 0.5 * 20.0


def test_mask_covering_the_image_has_no_ring_and_empty_masks_are_rejected():
    img = np.full((8, 8, 3), 50, np.uint8)
    s = defect_stats(img, np.ones((8, 8), bool))
    assert math.isnan(s["ring_mean"]) and math.isnan(s["contrast"]) and s["in_mask_mean"] == 50
    with pytest.raises(DataError, match="empty mask"):
        defect_stats(img, np.zeros((8, 8), bool))
    with pytest.raises(DataError, match="mask shape"):
        defect_stats(img, np.ones((4, 4), bool))
    with pytest.raises(DataError, match="uint8"):
        defect_stats(img.astype(np.float32), np.ones((8, 8), bool))


def _stats(contrasts, means=None):
    means = contrasts if means is None else means
    return [{"in_mask_mean": 100 + m, "in_mask_std": 5.0, "contrast": c, "edge_sharpness": 2.0}
            for c, m in zip(contrasts, means)]


def test_intensity_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    real = _stats(np.linspace(-60, -20, 21))  # IQR of contrast and mean: 20
    d0 = intensity_distance(real, real)
    assert d0["distance"] == 0 and all(v == 0 for v in d0["per_stat"].values())
    shifted = [dict(s, contrast=s["contrast"] + 20) for s in real]
    d1 = intensity_distance(shifted, real)
    # W1 of a shift by one IQR is 1 for that statistic; the mean over 4 statistics is 1/4
    assert d1["per_stat"]["contrast"] == pytest.approx(1.0) and d1["distance"] == pytest.approx(0.25)
    d2 = intensity_distance([dict(s, contrast=s["contrast"] + 40) for s in real], real)
    assert d2["distance"] == pytest.approx(0.5) and d2["distance"] > d1["distance"]
    # a statistic with zero spread on the real side falls back to the std, then to 1 (its unit)
    assert d1["scale"]["in_mask_std"] == 1.0
    d3 = intensity_distance([dict(s, in_mask_std=8.0) for s in real], real)
    assert d3["per_stat"]["in_mask_std"] == pytest.approx(3.0)
    with pytest.raises(DataError, match="needs synthetic and real"):
        intensity_distance([], real)


def test_intensity_distance_leaves_out_nan_values():
    real = _stats([-30.0, -40.0, -50.0])
    syn = _stats([-30.0, -40.0, -50.0]) + [{"in_mask_mean": 70.0, "in_mask_std": 5.0, "contrast": math.nan, "edge_sharpness": math.nan}]
    d = intensity_distance(syn, real)
    assert d["per_stat"]["contrast"] == 0 and d["per_stat"]["edge_sharpness"] == 0


def _crops(seed, n, **kw):
    rng = np.random.default_rng(seed)
    return [_soft_blob(rng, **kw)[0] for _ in range(n)]


def test_c2st_is_about_chance_for_the_same_distribution():
    accs = [c2st_accuracy(_crops(1, 40), _crops(2, 40), seed=s)["accuracy"] for s in range(3)]
    assert 0.3 <= np.mean(accs) <= 0.65, accs


def test_c2st_tells_clearly_different_sets_apart():
    real = _crops(1, 40)
    black_slabs = _crops(3, 40, depth=110, noise=1.0)  # pitch-black plateaus, no texture
    res = c2st_accuracy(real, black_slabs)
    assert res["accuracy"] >= 0.95 and len(res["folds"]) == 5
    assert res["n_real"] == res["n_syn"] == 40 and "logistic-regression" in res["classifier"]


def test_c2st_balances_classes_is_deterministic_and_rejects_tiny_sets():
    real, syn = _crops(1, 30), _crops(3, 12, depth=110, noise=1.0)
    a, b = c2st_accuracy(real, syn, seed=7), c2st_accuracy(real, syn, seed=7)
    assert a == b and a["n_real"] == a["n_syn"] == 12
    assert len(c2st_accuracy(real[:3], syn[:3], folds=5)["folds"]) == 3  # folds capped at the class size
    # indistinguishable sets of unequal size: balanced, so chance stays 0.5 (not 40/50 for "always real")
    accs = [c2st_accuracy(_crops(1, 40), _crops(2, 10), seed=s)["accuracy"] for s in range(3)]
    assert np.mean(accs) <= 0.65, accs
    with pytest.raises(DataError, match="c2st needs"):
        c2st_accuracy(real[:1], syn)


def test_c2st_depends_on_the_sets_not_their_order_and_averages_repeats():
    """One k-fold split of a few dozen crops is noisy (0.09 on the same Magnetic Tile images in
    another order): the accuracy is the mean over repeated splits of the crops in a canonical order."""
    real, syn = _crops(1, 16), _crops(4, 16)
    a = c2st_accuracy(real, syn, seed=0)
    b = c2st_accuracy(real[::-1], syn[5:] + syn[:5], seed=0)
    assert a == b  # same sets, other order: same result
    assert len(a["repeats"]) == 10 and a["accuracy"] == pytest.approx(np.mean(a["repeats"]))
    one = [c2st_accuracy(real, syn, seed=0, repeats=1)]
    assert one[0]["repeats"] == a["repeats"][:1]  # repeat 0 is the single-split test
    assert len(set(a["repeats"])) > 1  # the splits differ
    lo, hi = a["ci95"]
    assert lo < a["accuracy"] < hi and hi - lo > 0.2  # 32 predictions: a wide interval
    with pytest.raises(DataError, match="repeats"):
        c2st_accuracy(real, syn, repeats=0)


def test_wilson_interval_by_hand():
    from defectforge.metrics.realism import wilson_interval

    lo, hi = wilson_interval(0.75, 32)
    z = 1.96
    centre = (0.75 + z * z / 64) / (1 + z * z / 32)
    half = z * np.sqrt(0.75 * 0.25 / 32 + z * z / (4 * 32 * 32)) / (1 + z * z / 32)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(1.0, 10)[1] == 1.0 and wilson_interval(0.0, 10)[0] == 0.0

"""Quality metrics: known answers on tiny sets, skipped metrics, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.backbones import resolve_lpips_backbone
from defectforge.metrics.fidelity import (
    compute_fidelity,
    ic_lpips_from,
    images_to_tensor,
    lpips_features,
    lpips_matrix,
)

SIZE = 32


def _set(n: int, level: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.clip(level + rng.integers(-30, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def sets():
    return _set(6, 70, 0), _set(6, 180, 1)


def test_identical_sets_give_zero_fid_kid_lpips(sets):
    a, _ = sets
    q = compute_fidelity(a, a, size=SIZE)
    assert q["backbone"] == "random-vgg11-seed0"
    assert q["lpips_backbone"] == "random-alexnet-seed0+uniform-lin"
    assert abs(q["fid"]) < 1e-4
    assert abs(q["kid_mean"]) < 1e-4
    assert q["lpips"] == pytest.approx(0.0, abs=1e-6)  # every fake is one of the reals
    assert q["n_real"] == q["n_fake"] == 6


def test_different_sets_give_clearly_positive_fid_kid(sets):
    a, b = sets
    same = compute_fidelity(a, a, size=SIZE)
    diff = compute_fidelity(a, b, size=SIZE)
    assert diff["fid"] > 100 * max(abs(same["fid"]), 1e-6)
    assert diff["fid"] > 0.1
    assert diff["kid_mean"] > 1e-3 and diff["kid_mean"] > 100 * abs(same["kid_mean"])
    assert diff["lpips"] > 0.1


def test_random_backbone_is_skipped_with_reason(sets):
    a, b = sets
    q = compute_fidelity(a, b, size=SIZE)
    assert q["is_mean"] is None and "trained classifier" in q["is_skipped"]


def test_too_few_samples_are_skipped_with_reason(sets):
    a, b = sets
    q = compute_fidelity(a[:1], b[:3], size=SIZE)
    assert q["fid"] is None and q["fid_skipped"] == "needs >= 2 real and 2 fake images, got 1 real and 3 fake"
    assert q["kid_mean"] is None and q["kid_std"] is None and "needs >= 2" in q["kid_skipped"]
    assert q["lpips"] is not None and q["lpips_skipped"] is None
    q = compute_fidelity([], b[:3], size=SIZE)
    assert q["lpips"] is None and "needs >= 1 real" in q["lpips_skipped"]
    assert q["ic_lpips"] is None and q["ic_lpips_skipped"]


def test_nan_or_float_input_is_one_line_error(sets):
    a, _ = sets
    bad = a[0].astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(DefectforgeError, match=r"fake\[1\]: image contains NaN"):
        compute_fidelity(a, [a[0], bad], size=SIZE)
    with pytest.raises(DataError, match=r"real\[0\]: expected a uint8 image"):
        compute_fidelity([a[0].astype(np.float32)], a, size=SIZE)


def test_cached_lpips_equals_torchmetrics_forward(sets):
    a, b = sets
    net, _ = resolve_lpips_backbone("random-alexnet-seed0")
    xa, xb = images_to_tensor(a[:3], "a", SIZE), images_to_tensor(b[:2], "b", SIZE)
    d = lpips_matrix(net, lpips_features(net, xa), lpips_features(net, xb))
    for i in range(3):
        for j in range(2):
            direct = net(xa[i : i + 1].float() / 127.5 - 1, xb[j : j + 1].float() / 127.5 - 1)
            assert float(d[i, j]) == pytest.approx(float(direct), rel=1e-5)


def test_ic_lpips_by_hand(sets):
    a, b = sets
    net, _ = resolve_lpips_backbone("random-alexnet-seed0")
    x = images_to_tensor(a[:3] + b[:3], "x", SIZE)
    f = lpips_features(net, x)
    assign = torch.tensor([0, 0, 0, 1, 1, 2])  # clusters {0,1,2}, {3,4}, {5} (skipped: 1 member)
    ic, n = ic_lpips_from(net, f, assign)
    d = lpips_matrix(net, f, f)
    c0 = (d[0, 1] + d[0, 2] + d[1, 2]) / 3
    c1 = d[3, 4]
    assert n == 2
    assert ic == pytest.approx(float((c0 + c1) / 2), rel=1e-5)


def test_ic_lpips_clusters_fakes_around_reals(sets):
    a, b = sets
    # two reals far apart; fakes = 3 near a-like + 3 near b-like
    q = compute_fidelity([a[0], b[0]], a[1:4] + b[1:4], size=SIZE)
    assert q["ic_lpips_clusters"] == 2 and q["ic_lpips"] > 0


def test_crop_around_mask():
    from defectforge.metrics.fidelity import crop_around_mask

    im = np.arange(100 * 80 * 3, dtype=np.uint32).reshape(100, 80, 3).astype(np.uint8)
    m = np.zeros((100, 80), bool)
    m[40:50, 30:36] = True  # 10 x 6 box centred at (45, 33)
    c = crop_around_mask(im, m, context=2.0, min_side=8)
    assert c.shape == (20, 20, 3)
    assert np.array_equal(c, im[35:55, 23:43])
    m2 = np.zeros((100, 80), bool)
    m2[0:4, 76:80] = True  # corner: the crop shifts inside the image
    c2 = crop_around_mask(im, m2, min_side=32)
    assert c2.shape == (32, 32, 3) and np.array_equal(c2, im[0:32, 48:80])

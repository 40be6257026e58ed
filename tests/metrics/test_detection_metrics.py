"""Detection metrics on hand-made maps with known answers; AUPRO against a direct computation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.detection import DETECTION_KEYS, aupro, detection_metrics


def _masks():
    m = np.zeros((4, 16, 16), bool)
    m[0, 2:6, 2:6] = True
    m[0, 10:12, 9:15] = True  # second region in the same image
    m[1, 5:9, 5:7] = True
    return m  # images 2 and 3 are good


def test_perfect_maps_score_one():
    m = _masks()
    r = detection_metrics([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0], m.astype(float), m)
    for k in DETECTION_KEYS:
        assert r[k] == pytest.approx(1.0), k
    assert r["n_regions"] == 3 and r["n_defect_images"] == 2


def test_inverted_maps_score_zero_aupro():
    m = _masks()
    r = detection_metrics([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0], 1.0 - m, m)
    assert r["image_auroc"] == pytest.approx(0.0)
    assert r["pixel_auroc"] == pytest.approx(0.0)
    assert r["aupro"] == pytest.approx(0.0)


def test_hand_computed_image_metrics():
    # sorted by score: 0.8 (defect), 0.4 (good), 0.35 (defect), 0.1 (good)
    # AUROC: pairs (defect > good): (0.8>0.4), (0.8>0.1), (0.35>0.1) = 3 of 4 -> 0.75
    # AP: precision 1 at recall 0.5, 2/3 at recall 1 -> 0.5 * 1 + 0.5 * 2/3 = 0.8333
    # F1: t=0.8 -> 2/3; t=0.35 -> P=2/3, R=1 -> 0.8; t=0.1 -> 2/3. max 0.8
    m = np.zeros((4, 4, 4), bool)
    m[1, 1, 1] = m[2, 2, 2] = True
    r = detection_metrics([0.1, 0.8, 0.35, 0.4], [0, 1, 1, 0], m.astype(float), m)
    assert r["image_auroc"] == pytest.approx(0.75)
    assert r["image_ap"] == pytest.approx(5 / 6)
    assert r["image_f1max"] == pytest.approx(0.8)


def test_scores_outside_unit_range_are_not_squashed():
    # torchmetrics would apply a sigmoid to these and merge 30 and 40 into a tie.
    m = np.zeros((3, 2, 2), bool)
    m[0, 0, 0] = True
    r = detection_metrics([40.0, 30.0, 35.0], [1, 0, 0], np.zeros((3, 2, 2)), m)
    assert r["image_auroc"] == pytest.approx(1.0)


def _aupro_direct(scores: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Independent computation: loop over thresholds, curve truncated with np.interp, np.trapezoid."""
    regions = []
    for i, gt in enumerate(masks):
        lab, n = ndimage.label(gt, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    ok = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        above = scores >= t
        fprs.append(float(above[ok].sum() / ok.sum()))
        pros.append(float(np.mean([above[i][r].mean() for i, r in regions])))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= limit
    x = np.append(fprs[keep], limit)
    y = np.append(pros[keep], np.interp(limit, fprs, pros))
    return float(np.trapezoid(y, x)) / limit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_direct_computation(seed):
    rng = np.random.default_rng(seed)
    m = _masks()
    # a noisy, partly right map with ties (rounded scores)
    s = np.round(0.6 * m + rng.random(m.shape), 2)
    assert aupro(s, m) == pytest.approx(_aupro_direct(s, m, 0.3), abs=1e-9)
    assert aupro(s, m, 0.1) == pytest.approx(_aupro_direct(s, m, 0.1), abs=1e-9)


def test_aupro_hand_case():
    # one image, one 2-pixel region {a=0.9, b=0.5}, normal pixels 0.7 and 0.1 (ok = 2 pixels).
    # thresholds 0.9: FPR 0, PRO 1/2; 0.7: FPR 1/2, PRO 1/2; 0.5: FPR 1/2, PRO 1; 0.1: FPR 1, PRO 1.
    # to FPR 0.3: the segment (0, 1/2) -> (1/2, 1/2) is flat at 1/2: area = 0.3 * 0.5; normalised 0.5
    m = np.array([[[True, True, False, False]]])
    s = np.array([[[0.9, 0.5, 0.7, 0.1]]])
    assert aupro(s, m) == pytest.approx(0.5)
    # the first point (0, 0) -> (0, 1/2) is a vertical step, so no area is lost there.


def test_region_overlap_is_averaged_per_region_not_per_pixel():
    # a big region fully found and a small one missed: PRO = 1/2 although 90% of defect pixels are found
    m = np.zeros((1, 20, 20), bool)
    m[0, 0:9, 0:10] = True       # 90 px
    m[0, 15:17, 15:20] = True    # 10 px
    s = np.where(m, 0.0, 0.5)
    s[0, 0:9, 0:10] = 1.0
    # threshold 1.0: FPR 0, PRO 0.5; threshold 0.5: FPR 1, PRO 0.5; threshold 0: FPR 1, PRO 1
    assert aupro(s, m) == pytest.approx(0.5)


def test_single_class_is_skipped_with_reason():
    m = np.zeros((3, 4, 4), bool)
    r = detection_metrics([0.1, 0.2, 0.3], [0, 0, 0], np.zeros((3, 4, 4)), m)
    assert r["image_auroc"] is None and "defective and good" in r["image_skipped"]
    assert r["pixel_ap"] is None and r["aupro"] is None and r["aupro_skipped"]


def test_bad_input_errors():
    m = _masks()
    s = m.astype(float)
    s[0, 0, 0] = np.nan
    with pytest.raises(DefectforgeError, match="pixel_scores: contains NaN"):
        detection_metrics([1, 1, 0, 0], [1, 1, 0, 0], s, m)
    with pytest.raises(DataError, match="must both be"):
        detection_metrics([1, 1, 0, 0], [1, 1, 0, 0], m[:, :8].astype(float), m)
    with pytest.raises(DataError, match="image_labels"):
        detection_metrics([1, 1, 0], [1, 1, 0, 0], m.astype(float), m)

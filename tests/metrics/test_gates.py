"""Per-sample and set-level gates flag hand-made bad samples and pass a good one."""

from __future__ import annotations

import numpy as np
import pytest

from defectforge.errors import DataError, ParamsError
from defectforge.metrics.gates import GateThresholds, SetThresholds, gate_sample, gate_set, thresholds_from_dict


@pytest.fixture()
def good():
    rng = np.random.default_rng(0)
    normal = rng.integers(80, 120, (48, 48, 3), dtype=np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[16:28, 18:30] = True
    gen = normal.copy()
    gen[mask] = 30  # a dark defect, background untouched
    return normal, gen, mask


def test_good_sample_passes(good):
    normal, gen, mask = good
    att = mask.astype(float) + 0.01
    qc, ok, reasons = gate_sample(normal, gen, mask, refined_mask=mask, attention=att)
    assert ok and reasons == []
    assert qc["qc_bg_exact"] is True and qc["qc_bg_psnr"] == 100.0
    assert qc["qc_defect_contrast"] > 50 and qc["qc_mask_area"] == mask.sum()
    assert qc["qc_mask_inside_frac"] == 1.0 and qc["qc_attention_inside"] > 0.8


def test_changed_background_is_flagged(good):
    normal, gen, mask = good
    gen = gen.copy()
    gen[:8] = 255 - gen[:8]
    qc, ok, reasons = gate_sample(normal, gen, mask)
    assert not ok and any("background changed" in r for r in reasons)
    assert qc["qc_bg_exact"] is False and qc["qc_bg_psnr"] < 30


def test_small_seam_noise_at_the_mask_border_is_allowed(good):
    normal, gen, mask = good
    gen = gen.copy()
    gen[15, 18:30] = np.clip(gen[15, 18:30].astype(int) + 20, 0, 255)  # 1 px blending seam
    _, ok, reasons = gate_sample(normal, gen, mask)
    assert ok, reasons


def test_invisible_defect_is_flagged(good):
    normal, _, mask = good
    gen = normal.copy()
    gen[mask] = np.clip(normal[mask].astype(int) + 2, 0, 255)
    _, ok, reasons = gate_sample(normal, gen, mask)
    assert not ok and any("defect not visible" in r for r in reasons)


def test_empty_refined_mask_is_flagged(good):
    normal, gen, mask = good
    _, ok, reasons = gate_sample(normal, gen, mask, refined_mask=np.zeros_like(mask))
    assert not ok and any("refined mask empty" in r for r in reasons)


def test_refined_mask_outside_the_target_is_flagged(good):
    normal, gen, mask = good
    refined = np.zeros_like(mask)
    refined[36:46, 2:14] = True
    gen = gen.copy()
    gen[refined] = 30
    qc, ok, reasons = gate_sample(normal, gen, mask, refined_mask=refined)
    assert not ok and any("refined mask outside the target" in r for r in reasons)
    assert qc["qc_mask_inside_frac"] == 0.0


def test_attention_disagreeing_with_the_mask_is_flagged(good):
    normal, gen, mask = good
    att = np.zeros(mask.shape)
    att[0:10, 0:10] = 1.0
    _, ok, reasons = gate_sample(normal, gen, mask, attention=att)
    assert not ok and any("attention disagrees" in r for r in reasons)


def test_thresholds_are_parameters(good):
    normal, gen, mask = good
    _, ok, reasons = gate_sample(normal, gen, mask, thresholds=GateThresholds(contrast_min=500))
    assert not ok and "500" in reasons[0]
    assert thresholds_from_dict({"bg_psnr_min": 25}).bg_psnr_min == 25
    with pytest.raises(ParamsError, match="unknown GateThresholds key"):
        thresholds_from_dict({"bg_psnr": 25})


def test_shape_mismatch_is_one_line_error(good):
    normal, gen, mask = good
    with pytest.raises(DataError, match="shapes differ"):
        gate_sample(normal, gen[:10], mask)


def test_set_gate_readable_failures():
    q = {"kid_mean": 0.08, "fid": 40.0, "lpips": 0.2, "backbone": "random-vgg11-seed0",
         "lpips_backbone": "x", "kid_skipped": None}
    assert gate_set(q, 0.9, SetThresholds(kid_max=0.1, min_pass_rate=0.5)) == []
    f = gate_set(q, 0.2, SetThresholds(kid_max=0.05, min_pass_rate=0.5), label="crack/copy-paste")
    assert f == [
        "crack/copy-paste: kid_mean 0.08 > 0.05 (backbone random-vgg11-seed0)",
        "crack/copy-paste: only 20% of samples passed the per-sample gates < 50%",
    ]
    skipped = {"kid_mean": None, "kid_skipped": "needs >= 2 real and 2 fake images, got 1 real and 5 fake"}
    f = gate_set(skipped, None, SetThresholds(kid_max=0.05))
    assert f == ["kid_mean could not be checked against 0.05: needs >= 2 real and 2 fake images, got 1 real and 5 fake"]

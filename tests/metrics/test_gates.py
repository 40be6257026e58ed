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


# --------------------------------------------------------------------------- realism gates


def _grey_scene(seed=0, size=64):
    """A textured grey surface, an oval mask, and a realistic soft grey (Gaussian-profile) dark defect."""
    rng = np.random.default_rng(seed)
    normal = np.repeat(np.clip(rng.normal(120, 6, (size, size)), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    yy, xx = np.mgrid[:size, :size]
    prof = np.exp(-(((yy - 32) / 8.0) ** 2 + ((xx - 30) / 11.0) ** 2))
    mask = prof > 0.2
    soft = np.clip(normal.astype(float) - 50 * prof[..., None], 0, 255).astype(np.uint8)
    return normal, soft, mask


def _saturated_blob(normal, mask):
    gen = normal.copy()
    gen[mask] = 0  # a pitch-black plateau
    gen[mask & (np.arange(64)[None, :] % 7 == 0)] = 255  # with white speckle
    return gen


def _confetti(normal, mask, seed=0):
    rng = np.random.default_rng(seed)
    palette = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)], np.uint8)
    gen = normal.copy()
    gen[mask] = palette[rng.integers(0, len(palette), int(mask.sum()))]
    return gen


def test_realistic_soft_grey_defect_passes_the_realism_gates():
    normal, soft, mask = _grey_scene()
    qc, ok, reasons = gate_sample(normal, soft, mask, real={"saturated_share": 0.0, "chroma_excess": 0.0})
    assert ok, reasons
    assert qc["qc_saturated_share"] == 0 and qc["qc_saturated"] is False and qc["qc_colour_drift"] is False
    assert qc["qc_chroma"] == 0 and qc["qc_contrast_ring"] < -10


def test_saturated_blob_fails_its_gate():
    normal, _, mask = _grey_scene()
    qc, ok, reasons = gate_sample(normal, _saturated_blob(normal, mask), mask)
    assert not ok and qc["qc_saturated"] is True and qc["qc_saturated_share"] == 1.0
    assert any(r.startswith("saturated: 100% of in-mask pixels") for r in reasons), reasons
    assert qc["qc_colour_drift"] is False  # black and white are grey: no colour drift


def test_colour_confetti_fails_saturation_and_colour_drift():
    normal, _, mask = _grey_scene()
    qc, ok, reasons = gate_sample(normal, _confetti(normal, mask), mask)
    assert not ok and qc["qc_saturated"] is True and qc["qc_colour_drift"] is True
    assert qc["qc_chroma"] > 100 and qc["qc_chroma_source"] == 0
    assert any(r.startswith("colour drift: in-mask chroma") for r in reasons), reasons


def test_saturation_and_colour_allowance_follow_the_real_defects():
    normal, _, mask = _grey_scene()
    blob = _saturated_blob(normal, mask)
    # real defects of the type that are themselves black: a black sample is not flagged
    _, ok, reasons = gate_sample(normal, blob, mask, real={"saturated_share": 1.0, "chroma_excess": 0.0})
    assert ok, reasons
    # a rust-coloured stain is fine when the real stains are that much more colourful than their ring
    rust = normal.copy()
    rust[mask] = (170, 130, 110)  # chroma 60 on a grey surface
    _, ok, _ = gate_sample(normal, rust, mask)
    assert not ok
    _, ok, reasons = gate_sample(normal, rust, mask, real={"saturated_share": 0.0, "chroma_excess": 45.0})
    assert ok, reasons
    # just above and just below the default thresholds (5 % saturated, 20 grey levels of chroma)
    ys, xs = np.nonzero(mask)
    n = len(ys)
    assert n * 0.05 > 16  # the share decides, not the pixel floor
    for k, flagged in ((int(0.05 * n), False), (int(0.05 * n) + 2, True)):
        gen = normal.copy()
        gen[ys[:k], xs[:k]] = 0
        assert gate_sample(normal, gen, mask, thresholds=GateThresholds(contrast_min=0))[0]["qc_saturated"] is flagged
    # a few clipped pixels (a small share of a small mask above 5 %) are not a visible plateau
    small = np.zeros_like(mask)
    small[30:35, 30:36] = True  # 30 px
    gen = normal.copy()
    gen[small] = 40
    gen[30, 30:36] = 0  # 6 px = 20 %
    qc, ok, reasons = gate_sample(normal, gen, small)
    assert ok and qc["qc_saturated"] is False and qc["qc_saturated_share"] == 0.2, reasons
    gen[31:34, 30:36] = 0  # 24 px = 80 %
    assert gate_sample(normal, gen, small)[0]["qc_saturated"] is True
    for c, flagged in ((19, False), (21, True)):
        gen = normal.copy()
        gen[mask, 0] = np.clip(gen[mask, 0].astype(int) + c, 0, 255)
        assert gate_sample(normal, gen, mask, thresholds=GateThresholds(contrast_min=0))[0]["qc_colour_drift"] is flagged


def test_set_gate_fails_a_set_of_mostly_saturated_or_drifted_samples():
    t = SetThresholds(min_pass_rate=None)
    assert gate_set({"saturated_samples": 0.5, "colour_drift_samples": 0.0}, None, t) == []
    f = gate_set({"saturated_samples": 0.75, "colour_drift_samples": 1.0}, None, t, label="gravel/stain/blended")
    assert f == ["gravel/stain/blended: 75% of samples are saturated > 50%",
                 "gravel/stain/blended: 100% of samples are colour-drifted > 50%"]
    f = gate_set({"saturation": 0.2, "c2st_accuracy": 0.9, "c2st_skipped": None}, None,
                 SetThresholds(min_pass_rate=None, saturation_max=0.01, c2st_max=0.75))
    assert f == ["saturation 0.2 > 0.01", "c2st_accuracy 0.9 > 0.75"]


def test_speckle_tells_leftover_noise_from_a_smooth_defect_and_gates_it_against_the_reals():
    """Unsaturated, in-gamut grey noise (what the tiny model leaves inside brick holes) passes
    the saturation and colour gates; the speckle score tells it from a smooth defect by hand."""
    from defectforge.metrics.gates import real_reference
    from defectforge.metrics.realism import defect_stats

    normal, soft, mask = _grey_scene()
    rng = np.random.default_rng(0)
    noisy = soft.copy()
    noisy[mask] = np.clip(soft[mask].astype(int) + rng.choice([-30, 30], (int(mask.sum()), 1)), 0, 255).astype(np.uint8)
    s_soft, s_noisy = defect_stats(soft, mask)["speckle"], defect_stats(noisy, mask)["speckle"]
    assert s_noisy > 3 * s_soft  # the surface's own texture vs added pixel noise
    # by hand: isolated one-pixel spikes (+60 in the red channel only) on a flat patch; a 3x3
    # median removes each spike, so speckle = 60 x spikes / pixels of the 1-px-eroded mask
    flat = np.full((9, 9, 3), 100, np.uint8)
    for y, x in ((2, 2), (2, 5), (5, 2), (5, 5)):
        flat[y, x, 0] = 160
    inner = np.zeros((9, 9), bool)
    inner[1:8, 1:8] = True  # eroded by the cross: rows and columns 2..6, 25 px
    assert defect_stats(flat, inner)["speckle"] == pytest.approx(60 * 4 / 25)
    real = {**real_reference([defect_stats(soft, mask)]), "chroma_excess": 0.0}
    assert real["speckle"] == pytest.approx(s_soft)
    # measured, not gated by default
    qc, ok, reasons = gate_sample(normal, noisy, mask, real=real)
    assert ok, reasons
    assert qc["qc_speckle"] == pytest.approx(s_noisy, abs=1e-4) and qc["qc_speckled"] is None
    # gated at 2x the reals' (with a floor of one grey level)
    strict = GateThresholds(speckle_ratio_max=2.0)
    qc, ok, reasons = gate_sample(normal, noisy, mask, real=real, thresholds=strict)
    assert not ok and qc["qc_speckled"] is True and any(r.startswith("speckled:") for r in reasons), reasons
    qc, ok, reasons = gate_sample(normal, soft, mask, real=real, thresholds=strict)
    assert ok and qc["qc_speckled"] is False, reasons

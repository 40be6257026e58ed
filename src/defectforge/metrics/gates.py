"""Quality gates: per synthetic sample (written into the manifest) and per set.

A per-sample gate never drops a row: it returns the figures, a pass flag and the
reasons a sample failed, and the manifest keeps all three (``qc_*`` columns,
``qc_pass``, ``qc_reasons``). The checks follow what the generation methods promise:

1. **background preserved** — blended methods (AdaBLDM's latent + pixel blending,
   AnomalyDiffusion Eq. 1, ddim-inversion Prop. 1) keep the normal image outside the
   mask. Measured as PSNR between the normal and the generated image over the pixels
   outside the target mask dilated by ``bg_margin`` px (blending seams are allowed);
   an exact match is reported as ``PSNR_CAP`` dB.
2. **defect visible** — mean absolute difference (grey levels, 0..255) between the
   generated and the normal image inside the defect mask (the refined mask if
   there is one, else the raw mask).
3. **refined mask sane** — not empty, area within ``[area_ratio_min, area_ratio_max]``
   times the raw target mask, at most ``max_area_frac`` of the image, and at least
   ``inside_min`` of its pixels inside the target mask dilated by ``inside_margin``.
4. **attention agrees with the mask** — where a method provides an attention map,
   the fraction of its mass inside the (dilated) target mask.
5. **not saturated** — the share of in-mask pixels at the ends of the value range
   (:func:`~defectforge.metrics.realism.defect_stats`) at most ``saturation_max`` above
   the real defects' share of the type (real Magnetic Tile blowholes: 0); fewer than
   ``saturation_min_px`` saturated pixels never fail (a few clipped pixels at the bottom
   of a dark pit are not visible as a plateau; a black slab or confetti is).
6. **no colour drift** — the in-mask chroma (mean max - min over RGB) at most
   ``chroma_margin`` grey levels above the source surface's chroma around the mask,
   plus the excess the real defects of the type show over their own ring (a rust stain
   is more colourful than its gravel; confetti of pure R/G/B pixels is not a defect).

Example::

    >>> import numpy as np
    >>> normal = np.full((32, 32, 3), 100, np.uint8)
    >>> mask = np.zeros((32, 32), bool); mask[10:20, 10:20] = True
    >>> gen = normal.copy(); gen[mask] = 200
    >>> qc, ok, reasons = gate_sample(normal, gen, mask)
    >>> ok, reasons, qc["qc_bg_psnr"]
    (True, [], 100.0)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.realism import SATURATION_HIGH, SATURATION_LOW, defect_stats

PSNR_CAP = 100.0


@dataclass(frozen=True)
class GateThresholds:
    """Per-sample thresholds (params.yaml ``quality.gates``)."""

    bg_psnr_min: float = 30.0       # dB outside the dilated target mask
    bg_margin: int = 2              # px of dilation around the target mask for the bg check
    contrast_min: float = 8.0       # mean |generated - normal| inside the mask, grey levels
    area_min_px: int = 4            # refined (or raw) mask must have at least this many pixels
    area_ratio_min: float = 0.1     # refined area / raw area
    area_ratio_max: float = 4.0
    max_area_frac: float = 0.5      # refined area / image area
    inside_min: float = 0.8         # fraction of refined-mask pixels inside the dilated target
    inside_margin: int = 4          # px of dilation of the target for the inside check
    attention_inside_min: float = 0.5  # attention mass inside the dilated target
    saturation_max: float = 0.05    # in-mask saturated share above the real defects' share
    saturation_min_px: int = 16     # ... and at least this many saturated pixels
    chroma_margin: float = 20.0     # grey levels of in-mask chroma above the source's (+ the reals' excess)
    speckle_ratio_max: float | None = None  # in-mask speckle above this x the reals' 90th percentile (None: measured, not gated)
    ring: int = 4                   # px of the ring around the mask for the realism statistics


@dataclass(frozen=True)
class SetThresholds:
    """Set-level thresholds; ``None`` switches a check off."""

    kid_max: float | None = None
    fid_max: float | None = None
    lpips_min: float | None = None   # generated images must not be copies of the real ones
    min_pass_rate: float | None = 0.5
    saturated_samples_max: float | None = 0.5     # share of samples failing the saturation gate
    colour_drift_samples_max: float | None = 0.5  # share of samples failing the colour-drift gate
    saturation_max: float | None = None           # pooled in-mask saturated share of the set
    c2st_max: float | None = None                 # classifier two-sample test accuracy
    intensity_distance_max: float | None = None


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    if px <= 0:
        return mask
    return ndimage.binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=px)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    if a.size == 0:
        return PSNR_CAP
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse))


def gate_sample(
    normal: np.ndarray,
    generated: np.ndarray,
    raw_mask: np.ndarray,
    refined_mask: np.ndarray | None = None,
    attention: np.ndarray | float | None = None,
    thresholds: GateThresholds = GateThresholds(),
    *,
    real: dict | None = None,
) -> tuple[dict, bool, list[str]]:
    """Check one synthetic sample.

    Args:
        normal: uint8 (H, W, 3) defect-free source image.
        generated: uint8 (H, W, 3) synthetic image.
        raw_mask: bool (H, W) target mask the method was asked to fill.
        refined_mask: bool (H, W) mask the method/refinement reports, or None.
        attention: float (H, W) attention map (non-negative), or a float already giving
            the agreement score in [0, 1], or None when the method has none.
        real: reference figures of the real defects of the type: ``saturated_share``
            (pooled in-mask saturated share) and ``chroma_excess`` (how much their chroma
            exceeds their ring's, see :func:`real_reference`); None: 0 for both.

    Returns:
        (qc, passed, reasons): ``qc`` holds ``qc_bg_psnr``, ``qc_bg_exact``,
        ``qc_defect_contrast``, ``qc_mask_area``, ``qc_mask_area_ratio``,
        ``qc_mask_inside_frac``, ``qc_attention_inside``, the realism figures
        ``qc_saturated_share``, ``qc_in_mask_mean``, ``qc_contrast_ring``,
        ``qc_edge_sharpness``, ``qc_chroma``, ``qc_chroma_source`` and the flags
        ``qc_saturated``, ``qc_colour_drift`` (None where not applicable).
    """
    t = thresholds
    normal, generated, raw, refined = _checked(normal, generated, raw_mask, refined_mask)
    defect = refined if refined is not None else raw
    reasons: list[str] = []
    bg_psnr, bg_exact = _background_preserved(normal, generated, raw | defect, t, reasons)
    contrast = _defect_visible(normal, generated, defect, t, reasons)
    area, ratio, inside = _mask_sane(raw, refined, defect, t, reasons)
    att_inside = _attention_agrees(attention, raw, t, reasons)
    stats, saturated, drifted, speckled = _realistic(normal, generated, defect, real or {}, t, reasons)

    def r3(key):
        v = None if stats is None else stats[key]
        return None if v is None or not math.isfinite(v) else round(v, 4)

    qc = {
        "qc_bg_psnr": round(bg_psnr, 3),
        "qc_bg_exact": bg_exact,
        "qc_defect_contrast": round(contrast, 3),
        "qc_mask_area": area,
        "qc_mask_area_ratio": None if ratio is None else round(ratio, 4),
        "qc_mask_inside_frac": None if inside is None else round(inside, 4),
        "qc_attention_inside": None if att_inside is None else round(att_inside, 4),
        "qc_saturated_share": r3("saturated_share"),
        "qc_in_mask_mean": r3("in_mask_mean"),
        "qc_contrast_ring": r3("contrast"),
        "qc_edge_sharpness": r3("edge_sharpness"),
        "qc_chroma": r3("chroma"),
        "qc_chroma_source": r3("chroma_source"),
        "qc_speckle": r3("speckle"),
        "qc_saturated": saturated,
        "qc_colour_drift": drifted,
        "qc_speckled": speckled,
    }
    return qc, not reasons, reasons


# The checks of gate_sample, in the order of the module docstring. Each returns its
# figures and appends the reasons the sample fails it to ``reasons``.


def _checked(normal, generated, raw_mask, refined_mask) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The inputs as arrays (masks as bool), refused when a dtype or a shape is wrong."""
    normal, generated = np.asarray(normal), np.asarray(generated)
    raw = np.asarray(raw_mask).astype(bool)
    for name, im in (("normal", normal), ("generated", generated)):
        if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
            raise DataError(f"{name}: expected uint8 (H, W, 3), got {im.dtype} {im.shape}")
    if generated.shape != normal.shape or raw.shape != normal.shape[:2]:
        raise DataError(
            f"shapes differ: normal {normal.shape}, generated {generated.shape}, raw_mask {raw.shape}"
        )
    refined = None if refined_mask is None else np.asarray(refined_mask).astype(bool)
    if refined is not None and refined.shape != raw.shape:
        raise DataError(f"refined_mask shape {refined.shape} != raw_mask shape {raw.shape}")
    return normal, generated, raw, refined


def _background_preserved(normal, generated, target, t: GateThresholds, reasons: list[str]) -> tuple[float, bool]:
    """1. PSNR and exact match outside the target dilated by ``bg_margin``."""
    outside = ~_dilate(target, t.bg_margin)
    diff_out = normal[outside].astype(np.int16) - generated[outside].astype(np.int16)
    bg_exact = bool(np.all(diff_out == 0))
    bg_psnr = _psnr(normal[outside], generated[outside])
    if bg_psnr < t.bg_psnr_min:
        reasons.append(f"background changed outside the mask: PSNR {bg_psnr:.1f} dB < {t.bg_psnr_min}")
    return bg_psnr, bg_exact


def _defect_visible(normal, generated, defect, t: GateThresholds, reasons: list[str]) -> float:
    """2. Mean |generated - normal| of the grey levels inside the defect mask (0 when it is empty)."""
    if not defect.any():
        return 0.0
    g = generated.astype(np.float64).mean(axis=2)
    n = normal.astype(np.float64).mean(axis=2)
    contrast = float(np.abs(g - n)[defect].mean())
    if contrast < t.contrast_min:
        reasons.append(f"defect not visible: mean contrast {contrast:.1f} < {t.contrast_min} grey levels")
    return contrast


def _mask_sane(raw, refined, defect, t: GateThresholds, reasons: list[str]) -> tuple[int, float | None, float | None]:
    """3. (area, area / raw area, share inside the dilated target) of the refined mask, else the raw one."""
    area = int(defect.sum())
    raw_area = int(raw.sum())
    ratio = area / raw_area if raw_area else None
    inside = None
    if area < t.area_min_px:
        which = "refined" if refined is not None else "raw"
        reasons.append(f"{which} mask empty or tiny: {area} px < {t.area_min_px}")
    if area / defect.size > t.max_area_frac:
        reasons.append(f"mask covers {area / defect.size:.0%} of the image > {t.max_area_frac:.0%}")
    if refined is not None:
        if raw_area == 0:
            reasons.append("raw target mask is empty")
        elif area and not (t.area_ratio_min <= ratio <= t.area_ratio_max):
            reasons.append(
                f"refined mask area {area} px is {ratio:.2f}x the target "
                f"(allowed {t.area_ratio_min}-{t.area_ratio_max})"
            )
        if area:
            inside = float((refined & _dilate(raw, t.inside_margin)).sum() / area)
            if inside < t.inside_min:
                reasons.append(f"refined mask outside the target: {inside:.0%} inside < {t.inside_min:.0%}")
    return area, ratio, inside


def _attention_agrees(attention, raw, t: GateThresholds, reasons: list[str]) -> float | None:
    """4. Share of the attention mass inside the target dilated by ``inside_margin`` (None: no attention)."""
    if attention is None:
        return None
    if np.isscalar(attention):
        att_inside = float(attention)
    else:
        att = np.asarray(attention, dtype=np.float64)
        if att.shape != raw.shape:
            raise DataError(f"attention shape {att.shape} != mask shape {raw.shape}")
        if not np.isfinite(att).all():
            raise DefectforgeError("attention map contains NaN or infinite values")
        att = np.clip(att, 0, None)
        total = att.sum()
        att_inside = float(att[_dilate(raw, t.inside_margin)].sum() / total) if total > 0 else 0.0
    if not math.isfinite(att_inside):
        raise DefectforgeError(f"attention agreement is {att_inside}")
    if att_inside < t.attention_inside_min:
        reasons.append(
            f"attention disagrees with the mask: {att_inside:.0%} of its mass inside < {t.attention_inside_min:.0%}"
        )
    return att_inside


def _realistic(normal, generated, defect, real: dict, t: GateThresholds, reasons: list[str]):
    """5./6. Realism statistics inside the defect mask and the saturated / colour-drift / speckle
    flags against the real defects' figures: (stats, saturated, drifted, speckled), all None
    when the mask is empty (speckled also when it is not gated)."""
    if not defect.any():
        return None, None, None, None
    stats = defect_stats(generated, defect, ring=t.ring, reference=normal)
    sat_real = float(real.get("saturated_share") or 0.0)
    saturated = stats["saturated_share"] > sat_real + t.saturation_max and stats["saturated_px"] >= t.saturation_min_px
    if saturated:
        reasons.append(
            f"saturated: {stats['saturated_share']:.0%} of in-mask pixels ({stats['saturated_px']:.0f} px) at "
            f"0-{SATURATION_LOW} or {SATURATION_HIGH}-255 > {sat_real:.0%} (real defects) + {t.saturation_max:.0%}"
        )
    allowed = stats["chroma_source"] + t.chroma_margin + max(0.0, float(real.get("chroma_excess") or 0.0))
    drifted = stats["chroma"] > allowed
    if drifted:
        reasons.append(
            f"colour drift: in-mask chroma {stats['chroma']:.0f} > {allowed:.0f} grey levels "
            f"(source around the mask {stats['chroma_source']:.0f} + margin)"
        )
    speckled = None
    speckle_real = real.get("speckle")
    if t.speckle_ratio_max is not None and speckle_real is not None:
        allowed_speckle = t.speckle_ratio_max * max(float(speckle_real), 1.0)
        speckled = stats["speckle"] > allowed_speckle
        if speckled:
            reasons.append(f"speckled: in-mask pixel noise {stats['speckle']:.1f} > {allowed_speckle:.1f} grey levels "
                           f"({t.speckle_ratio_max:g} x the real defects' {float(speckle_real):.1f})")
    return stats, saturated, drifted, speckled


def gate_set(quality: dict, pass_rate: float | None = None, thresholds: SetThresholds = SetThresholds(),
             label: str = "") -> list[str]:
    """Readable failures of a generated set (empty list = the set passes).

    ``quality`` is a :func:`~defectforge.metrics.fidelity.compute_fidelity` result,
    with the quality stage's realism keys (``saturation``, ``c2st_accuracy``,
    ``intensity_distance``, and ``saturated_samples`` / ``colour_drift_samples``: the
    share of its samples that failed the saturation / colour-drift gate);
    ``pass_rate`` the fraction of its samples that passed :func:`gate_sample`. A
    threshold on a metric that was skipped is a failure too (it was not shown to hold).
    """
    t = thresholds
    where = f"{label}: " if label else ""
    bb = quality.get("backbone", "?")
    failures = []

    def check(key: str, limit, worse: str, skipped_key: str, backbone: str):
        if limit is None:
            return
        v = quality.get(key)
        if v is None:
            failures.append(f"{where}{key} could not be checked against {limit}: "
                            f"{quality.get(skipped_key) or 'not computed'}")
        elif (v > limit) if worse == "above" else (v < limit):
            op = ">" if worse == "above" else "<"
            failures.append(f"{where}{key} {v:.4g} {op} {limit}" + (f" (backbone {backbone})" if backbone != "none" else ""))

    check("kid_mean", t.kid_max, "above", "kid_skipped", bb)
    check("fid", t.fid_max, "above", "fid_skipped", bb)
    check("lpips", t.lpips_min, "below", "lpips_skipped", quality.get("lpips_backbone", "?"))
    check("saturation", t.saturation_max, "above", "saturation_skipped", "none")
    check("c2st_accuracy", t.c2st_max, "above", "c2st_skipped", "none")
    check("intensity_distance", t.intensity_distance_max, "above", "intensity_skipped", "none")
    for key, limit, what in (("saturated_samples", t.saturated_samples_max, "saturated"),
                             ("colour_drift_samples", t.colour_drift_samples_max, "colour-drifted")):
        v = quality.get(key)
        if limit is not None and v is not None and v > limit:
            failures.append(f"{where}{v:.0%} of samples are {what} > {limit:.0%}")
    if t.min_pass_rate is not None and pass_rate is not None and pass_rate < t.min_pass_rate:
        failures.append(f"{where}only {pass_rate:.0%} of samples passed the per-sample gates "
                        f"< {t.min_pass_rate:.0%}")
    return failures


def thresholds_from_dict(d: dict | None, cls=GateThresholds):
    """Build a thresholds dataclass from a params dict, rejecting unknown keys."""
    from defectforge.errors import ParamsError

    d = dict(d or {})
    known = set(asdict(cls()).keys())
    unknown = sorted(set(d) - known)
    if unknown:
        raise ParamsError(f"unknown {cls.__name__} key(s) {unknown}; known: {sorted(known)}")
    return cls(**d)


def real_reference(stats: list[dict], *, quantile: float = 90.0) -> dict:
    """Reference figures of the real defects of a type for :func:`gate_sample`'s ``real``.

    ``saturated_share``: pooled in-mask saturated share; ``chroma_excess``: the
    ``quantile``-th percentile of (in-mask chroma - ring chroma) over the real defects;
    ``speckle``: the ``quantile``-th percentile of their in-mask speckle.
    """
    from defectforge.metrics.realism import pooled_saturation

    excess = [s["chroma"] - s["chroma_ring"] for s in stats if math.isfinite(s["chroma_ring"])]
    return {
        "saturated_share": pooled_saturation(stats) or 0.0,
        "chroma_excess": float(np.percentile(excess, quantile)) if excess else 0.0,
        "speckle": float(np.percentile([s["speckle"] for s in stats], quantile)) if stats else None,
    }

"""The findings of a run in words, shared by the HTML report and the dataset card: the
detector's verdicts per protocol (helps / hurts / no measurable effect / did not learn),
its resolution, and the realism scores per method.

Every function takes the plain dicts the stages write (``detector/details.json``, the
quality stage's per-set rows) and returns a sentence or a small dict; nothing here
renders HTML or reads files.
"""

from __future__ import annotations

import math
from typing import Sequence

from defectforge.params.needs import REFERENCE_METHOD as REFERENCE

BASELINE = "real-only"

METRIC_NAMES = {"pixel_ap": "pixel AP", "aupro": "AUPRO", "image_auroc": "image AUROC", "image_ap": "image AP",
                "pixel_auroc": "pixel AUROC", "pixel_f1max": "pixel F1-max", "image_f1max": "image F1-max"}
VERDICTS = ("helps", "hurts", "no measurable effect", "detector did not learn")
NOT_LEARNED = "detector did not learn"


def method_columns(methods: Sequence[str]) -> list[str]:
    """Method order of the grid: the reference baseline (``copy-paste``) first, then the others as given."""
    return [m for m in methods if m == REFERENCE] + [m for m in methods if m != REFERENCE]


def metric_name(key: str) -> str:
    return METRIC_NAMES.get(key, key)


PROTOCOL_WORDS = {"mixed": "real + synthetic defects + normal images in training",
                  "synthetic": "synthetic defects + normal images in training, no real defect image"}
BUDGET_WORDS = {"steps": "the same number of steps for every run, counted from the real training split",
                "epochs": "the same number of passes over each run's own training union"}



def protocol_tag(row: dict) -> str:
    """``protocol mixed vs real-only, budget steps`` for a detector row that records them
    (comparisons, learned entries, absolute rows); '' for rows of a run made before."""
    protocol = row.get("protocol")
    if not protocol:
        return ""
    ref = row.get("reference")
    tag = f"protocol {protocol}" + (f" vs {ref}" if ref else "")
    return tag + (f", budget {row['budget']}" if row.get("budget") else "")


def describe_comparison(row: dict, learned: dict | None = None) -> str:
    """One sentence for one row of the detector's ``comparisons``.

    >>> describe_comparison({"method": "inversion", "metric": "pixel_ap", "mean_diff": 0.01, "ci_low": -0.02,
    ...                      "ci_high": 0.04, "n_seeds": 3, "verdict": "no measurable effect"})
    'inversion: no measurable effect on pixel AP (Δ +0.010, 95 % CI [-0.020, +0.040], 3 seeds)'
    """
    method, metric = row.get("method", "?"), metric_name(str(row.get("metric", "?")))
    if row.get("defect_type") not in (None, "", "all"):
        method = f"{method} ({row['defect_type']})"
    verdict = row.get("verdict")
    tag = protocol_tag(row)
    if verdict == NOT_LEARNED or (learned is not None and learned.get("learned") is False):
        return f"{method}: {metric} not measured: the detector did not learn on this category" + (f" ({tag})" if tag else "")
    numbers = f"Δ {signed(row.get('mean_diff'))}, 95 % CI [{signed(row.get('ci_low'))}, {signed(row.get('ci_high'))}]"
    seeds = row.get("n_seeds")
    if seeds is not None:
        numbers += f", {seeds} seed{'s' if seeds != 1 else ''}"
    if tag:
        numbers += f"; {tag}"
    if verdict == "hurts":
        words = f"hurts {metric}"
    elif verdict == "helps":
        words = f"helps {metric}"
    elif verdict == "no measurable effect":
        words = f"no measurable effect on {metric}"
    else:
        words = f"{verdict or 'no verdict'} on {metric}"
    return f"{method}: {words} ({numbers})"


def not_learned_sentence(category: str, info: dict) -> str:
    """The plain sentence for a category whose detector did not learn (no ranking follows)."""
    auroc = info.get("image_auroc_real_only")
    bits = [protocol_tag(info)] if protocol_tag(info) else []
    if isinstance(auroc, (int, float)) and "AUROC" not in str(info.get("reason", "")):
        bits.append(f"real-only image AUROC {auroc:.3f}")
    if info.get("reason"):
        bits.append(str(info["reason"]))
    extra = f" ({'; '.join(bits)})" if bits else ""
    return (f"The detector did not learn on {category}{extra}, so its numbers say nothing about the synthetic data; "
            "no method is ranked on this category.")


def signed(v) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "?"
    if 0 < abs(v) < 0.0005:  # an interval end just off 0 must not read as 0 (it decides the verdict)
        return f"{v:+.1e}"
    return f"{v:+.3f}"


def detector_findings(detector: dict | None) -> list[tuple[str, str]]:
    """(kind, sentence) findings of a detector details dict, worst first: the categories whose
    detector did not learn, the rows where synthetic data hurts, then the ones where it helps.
    ``kind`` is ``not-learned``, ``hurts``, ``helps`` or ``single-seed``."""
    if not detector:
        return []
    out = []
    by_protocol = learned_by_protocol(detector)
    for protocol, learned in by_protocol.items():
        for category, info in sorted(learned.items()):
            if isinstance(info, dict) and info.get("learned") is False:
                out.append(("not-learned", not_learned_sentence(category, info)))
    if "comparisons" not in detector:
        if detector.get("per_category") or detector.get("mean"):
            out.append(("single-seed", "The detector ran one seed per condition: its differences are within "
                        "seed-to-seed noise and are not a ranking of the methods."))
        return out
    skip = {(q, c) for q, learned in by_protocol.items() for c, info in learned.items() if isinstance(info, dict) and info.get("learned") is False}
    rows = detector.get("comparisons") or []
    rows = [r for r in rows if r.get("defect_type") in (None, "", "all")] or rows  # the whole test set when there
    for kind in ("hurts", "helps"):
        for r in rows:
            if r.get("verdict") == kind and (r.get("protocol", "mixed"), r.get("category")) not in skip:
                out.append((kind, f"{r.get('category')}: {describe_comparison(r)}"))
    return out


def learned_by_protocol(detector: dict) -> dict[str, dict]:
    """``{protocol: {category: learned entry}}`` of a details dict (one made before protocols
    were recorded: its ``learned``, as ``mixed``)."""
    if isinstance(detector.get("learned_by_protocol"), dict):
        return detector["learned_by_protocol"]
    return {"mixed": detector.get("learned") or {}}


def protocol_heading(detector: dict, protocol: str) -> str:
    """The words naming a protocol, its reference and the budget, e.g. ``Protocol mixed (real +
    synthetic defects + normal images in training), against real-only; budget steps (...)``."""
    ref = (detector.get("references") or {}).get(protocol)
    budget = detector.get("training_budget")
    against = f"against {ref}" if ref else "no reference run (copy-paste is not among the methods): absolute numbers only"
    return (f"Protocol {protocol} ({PROTOCOL_WORDS.get(protocol, protocol)}), {against}; "
            f"budget {budget} ({BUDGET_WORDS.get(budget, budget)})")


def resolution_words(r: dict) -> str:
    """The detector's resolution of one category in words, e.g. ``scale 0.43, 64 px patches, batch norm,
    score pool 5 (images' short side 253 px, smallest defects 11.8 px across)``."""
    scale = f"short side {r.get('size')} px" if r.get("scale") is None else f"scale {r['scale']}"
    patch = "whole images" if r.get("patch") is None else f"{r['patch']} px patches"
    src = ""
    if isinstance(r.get("short_side_px"), (int, float)):
        d = r.get("defect_px")
        src = f" (images' short side {r['short_side_px']:.0f} px" + (f", smallest defects {d:.1f} px across)" if isinstance(d, (int, float)) else ")")
    return f"{scale}, {patch}, {r.get('norm')} norm, score pool {r.get('score_pool')}{src}"


def absolute_sentence(row: dict) -> str:
    """One line of a run's absolute number: ``perlin: pixel AP 0.123, 95 % CI [...], 3 seeds; protocol synthetic, budget epochs``."""
    lo, hi = row.get("ci_low"), row.get("ci_high")
    ci = f"95 % CI [{lo:.3f}, {hi:.3f}]" if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else "95 % CI unbounded"
    mean = row.get("mean")
    mean = f"{mean:.3f}" if isinstance(mean, (int, float)) else "?"
    return f"{row.get('run')}: {metric_name(str(row.get('metric')))} {mean}, {ci}, {row.get('n_seeds')} seeds; {protocol_tag(row)}"


REALISM_KEYS = ("saturation", "saturation_real", "intensity_distance", "contrast_median", "contrast_real_iqr",
                "c2st_accuracy", "c2st_real_vs_real", "speckle_ratio")
SPECKLE_FLAG = 2.0  # a set whose median speckle is over this x its reals' is marked in the table
REALISM_EXPLAINED = (
    ("saturated share", "share of in-mask pixels at the ends of the value range (a channel ≤ 3 or ≥ 252); "
     "in brackets the same share over the real defects of the type."),
    ("intensity distance", "distance between synthetic and real defects in per-sample statistics (in-mask mean "
     "and spread, contrast against a ring around the mask, edge sharpness); 0 = the same profile."),
    ("contrast", "median in-mask contrast (in-mask mean minus ring mean) of the set against the real defects' "
     "interquartile range; 'inside' means within it."),
    ("speckle", "median pixel-scale noise inside the masks (what a 3x3 median filter removes) over that of the "
     "real defects of the type; 1 = as noisy as real, several times more = leftover sampler noise or confetti."),
    ("C2ST accuracy", "held-out accuracy of a small cross-validated classifier told to separate real defect crops "
     "from these; 0.5 = indistinguishable, 1.0 = always told apart. References: a real-vs-real split "
     "(what 'indistinguishable' reads as on this little data) and copy-paste of the same type."),
)



def finite(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def percent(v) -> str:
    v = finite(v)
    return "—" if v is None else f"{100 * v:.1f} %"


def sig3(v) -> str:
    v = finite(v)
    return "—" if v is None else f"{v:.3g}"


def contrast_inside(row: dict) -> bool | None:
    """Whether a set's median contrast lies within the real defects' interquartile range."""
    c, iqr = finite(row.get("contrast_median")), row.get("contrast_real_iqr")
    if c is None or not isinstance(iqr, (list, tuple)) or len(iqr) != 2 or None in (finite(iqr[0]), finite(iqr[1])):
        return None
    return iqr[0] <= c <= iqr[1]



def realism_by_method(sets: Sequence[dict]) -> dict[str, dict]:
    """Per method, the realism scores over its sets: mean saturation (and the real one), mean
    C2ST accuracy (and the real-vs-real and copy-paste references over the same defect
    types), mean intensity distance, and in how many sets the contrast lies in the real IQR."""
    rows = [r for r in sets if any(k in r for k in REALISM_KEYS)]
    cp = {(r.get("category"), r.get("defect_type")): finite(r.get("c2st_accuracy")) for r in rows if r.get("method") == REFERENCE}

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None

    out: dict[str, dict] = {}
    methods = method_columns(list(dict.fromkeys(str(r.get("method")) for r in rows)))
    for m in methods:
        mine = [r for r in rows if str(r.get("method")) == m]
        inside = [contrast_inside(r) for r in mine]
        out[m] = {
            "sets": len(mine),
            "saturation": mean(finite(r.get("saturation")) for r in mine),
            "saturation_real": mean(finite(r.get("saturation_real")) for r in mine),
            "intensity_distance": mean(finite(r.get("intensity_distance")) for r in mine),
            "c2st_accuracy": mean(finite(r.get("c2st_accuracy")) for r in mine),
            "c2st_real_vs_real": mean(finite(r.get("c2st_real_vs_real")) for r in mine),
            "c2st_copy_paste": None if m == REFERENCE else mean(cp.get((r.get("category"), r.get("defect_type"))) for r in mine),
            "contrast_inside": sum(1 for i in inside if i), "contrast_known": sum(1 for i in inside if i is not None),
        }
    return out


def realism_sentence(method: str, r: dict) -> str:
    """One line of a method's realism scores (see :func:`realism_by_method`).

    >>> realism_sentence("inversion", {"sets": 2, "saturation": 0.0, "saturation_real": 0.0, "c2st_accuracy": 0.6,
    ...     "c2st_real_vs_real": 0.5, "c2st_copy_paste": 0.7, "intensity_distance": 0.8, "contrast_inside": 1, "contrast_known": 2})
    'inversion: saturated in-mask share 0.0 % (real 0.0 %); C2ST accuracy 0.6 (0.5 = indistinguishable; real-vs-real 0.5, copy-paste 0.7); intensity distance 0.8; contrast within the real IQR in 1 of 2 sets (mean over 2 sets)'
    """
    bits = []
    if r.get("saturation") is not None:
        bits.append(f"saturated in-mask share {percent(r['saturation'])} (real {percent(r.get('saturation_real'))})")
    if r.get("c2st_accuracy") is not None:
        refs = [f"real-vs-real {sig3(r.get('c2st_real_vs_real'))}"]
        if r.get("c2st_copy_paste") is not None:
            refs.append(f"copy-paste {sig3(r['c2st_copy_paste'])}")
        bits.append(f"C2ST accuracy {sig3(r['c2st_accuracy'])} (0.5 = indistinguishable; {', '.join(refs)})")
    if r.get("intensity_distance") is not None:
        bits.append(f"intensity distance {sig3(r['intensity_distance'])}")
    if r.get("contrast_known"):
        k = r["contrast_known"]
        bits.append(f"contrast within the real IQR in {r['contrast_inside']} of {k} set{'' if k == 1 else 's'}")
    n = r.get("sets", 0)
    return f"{method}: {'; '.join(bits) or 'no realism scores'} (mean over {n} set{'' if n == 1 else 's'})"

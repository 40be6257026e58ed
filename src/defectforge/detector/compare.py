"""Paired comparison of detector runs over seeds: mean difference, 95 % t-interval, verdict.

Every seed trains the reference run and each method's run from the same initial weights
and the same order of real images (:func:`~defectforge.detector.train.train_detector`),
so the per-seed difference ``d_s = metric(method, s) - metric(reference, s)`` removes
the seed's own luck. The reference of each protocol (:func:`compare_protocols`):
``mixed`` (real + synthetic defects + normals): ``real-only``; ``synthetic`` (synthetic
defects + normals, no real defect): ``copy-paste``'s synthetic set, the model-free
baseline, when copy-paste is among the methods, else none (absolute numbers only,
:func:`absolute_intervals`). Over ``n`` seeds (Student's paired t-interval):

    mean  d_bar = (1/n) sum_s d_s
    sd    s_d   = sqrt( sum_s (d_s - d_bar)^2 / (n - 1) )
    95 %  d_bar -/+ t_{0.975, n-1} * s_d / sqrt(n)

With one seed the interval is unbounded (written as ``null``). Verdicts: ``helps`` when
the interval lies above 0, ``hurts`` when below 0, ``no measurable effect`` when it
contains 0; ``detector did not learn`` for every row of a category whose reference
detector is not clearly better than chance (:func:`learned`), and then nothing is ranked.

Sanity rule (:func:`learned`): a category's detector learned when the mean image AUROC of
the reference run (real-only, or copy-paste in the synthetic protocol) over seeds is at
least ``0.6`` and, with two or more seeds, the lower end of its 95 % t-interval is above
``0.5`` (chance). One seed: the mean rule alone.

Example::

    >>> r = paired_interval([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    >>> round(r["mean_diff"], 3), round(r["ci_low"], 3), round(r["ci_high"], 3), r["verdict"]
    (0.2, -0.048, 0.448, 'no measurable effect')
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from defectforge.errors import DefectforgeError
from defectforge.params.needs import REFERENCE_METHOD

HELPS, HURTS, NO_EFFECT, DID_NOT_LEARN = "helps", "hurts", "no measurable effect", "detector did not learn"
VERDICTS = (HELPS, HURTS, NO_EFFECT, DID_NOT_LEARN)
COMPARED_METRICS = ("pixel_ap", "aupro", "image_auroc", "pixel_auroc")
BASELINE = "real-only"
SYNTHETIC_REFERENCE = REFERENCE_METHOD  # copy-paste, the model-free baseline: the reference of the synthetic protocol
PROTOCOLS = ("mixed", "synthetic")
LEARNED_MIN_MEAN = 0.6
CHANCE = 0.5


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high) of the Student t-interval of the mean; (mean, None, None) for n < 2."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or not len(v):
        raise DefectforgeError("t_interval: needs a non-empty list of numbers")
    if not np.isfinite(v).all():
        raise DefectforgeError(f"t_interval: values must be finite, got {v.tolist()}")
    if not 0 < confidence < 1:
        raise DefectforgeError(f"t_interval: confidence must be in (0, 1), got {confidence}")
    n, mean = len(v), float(v.mean())
    if n < 2:
        return mean, None, None
    se = float(v.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * se
    return mean, mean - half, mean + half


def verdict(ci_low: float | None, ci_high: float | None) -> str:
    """``helps`` (interval above 0), ``hurts`` (below 0), else ``no measurable effect``."""
    if ci_low is not None and ci_low > 0:
        return HELPS
    if ci_high is not None and ci_high < 0:
        return HURTS
    return NO_EFFECT


def paired_interval(treated: Sequence[float], baseline: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean paired difference ``treated - baseline`` (same seeds, same order) with its t-interval."""
    a, b = np.asarray(treated, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape:
        raise DefectforgeError(f"paired_interval: {a.size} treated values but {b.size} baseline values (pair them by seed)")
    mean, lo, hi = t_interval(a - b, confidence)
    return {"mean_diff": mean, "ci_low": lo, "ci_high": hi, "n_seeds": int(a.size), "verdict": verdict(lo, hi)}


def learned(image_auroc_real_only: Sequence[float], confidence: float = 0.95, reference: str = BASELINE) -> dict:
    """The sanity check of one category: did the reference detector (real-only) learn anything?

    With another ``reference`` run (copy-paste in the synthetic protocol) its mean is under
    ``image_auroc_reference`` and the entry names the ``reference``."""
    mean, lo, _ = t_interval(image_auroc_real_only, confidence)
    n = len(image_auroc_real_only)
    ok = mean >= LEARNED_MIN_MEAN and (lo is None or lo > CHANCE)
    if ok:
        reason = f"{reference} image AUROC {mean:.3f} over {n} seed(s)" + (f", 95 % interval low end {lo:.3f} > {CHANCE}" if lo is not None else "")
    elif mean < LEARNED_MIN_MEAN:
        reason = f"{reference} image AUROC {mean:.3f} over {n} seed(s) is below {LEARNED_MIN_MEAN}: not clearly better than chance"
    else:
        reason = f"{reference} image AUROC {mean:.3f}, but its 95 % interval reaches {lo:.3f} <= {CHANCE} (chance) over {n} seeds"
    key = "image_auroc_real_only" if reference == BASELINE else "image_auroc_reference"
    out = {"learned": bool(ok), "reason": reason, key: round(mean, 4), "image_auroc_ci_low": None if lo is None else round(lo, 4), "n_seeds": n}
    return out if reference == BASELINE else {**out, "reference": reference}


def compare_runs(rows: Iterable[dict], metrics: Sequence[str] = COMPARED_METRICS, confidence: float = 0.95,
                 reference: str = BASELINE) -> tuple[list[dict], dict]:
    """Paired comparisons against ``reference`` and the sanity check from per-seed evaluation rows
    (of one protocol: :func:`compare_protocols` splits them).

    Args:
        rows: one per (category, defect_type, run, seed) with the metric values, e.g.
            ``{"category": "tile", "defect_type": "all", "run": "real-only", "seed": 0, "pixel_ap": 0.3, ...}``.

    Returns:
        (comparisons, learned): the ``comparisons`` rows of the detector contract
        ``{category, defect_type, method, metric, mean_diff, ci_low, ci_high, n_seeds, verdict}``
        (seeds where either run has no value for the metric are left out of that pair) and
        ``{category: learned(...)}`` from the ``all`` rows of ``reference``.
    """
    table: dict[tuple, dict[int, dict]] = {}
    for r in rows:
        table.setdefault((r["category"], r["defect_type"], r["run"]), {})[int(r["seed"])] = r
    learned_by_cat = {}
    for (cat, dt, run), by_seed in sorted(table.items()):
        if run == reference and dt == "all":
            vals = [m["image_auroc"] for _, m in sorted(by_seed.items()) if isinstance(m.get("image_auroc"), (int, float))]
            learned_by_cat[cat] = learned(vals, confidence, reference) if vals else {
                "learned": False, "reason": f"no {reference} image AUROC (the test set lacks defective or good images)",
                "image_auroc_real_only" if reference == BASELINE else "image_auroc_reference": None, "image_auroc_ci_low": None, "n_seeds": 0,
                **({} if reference == BASELINE else {"reference": reference})}
    comparisons = []
    for (cat, dt, run), by_seed in sorted(table.items()):
        base = table.get((cat, dt, reference))
        if run == reference or base is None:
            continue
        for metric in metrics:
            seeds = [s for s in sorted(by_seed) if s in base and all(isinstance(x.get(metric), (int, float)) for x in (by_seed[s], base[s]))]
            if not seeds:
                continue
            r = paired_interval([by_seed[s][metric] for s in seeds], [base[s][metric] for s in seeds], confidence)
            if not learned_by_cat.get(cat, {}).get("learned", False):
                r["verdict"] = DID_NOT_LEARN
            comparisons.append({"category": cat, "defect_type": dt, "method": run, "metric": metric,
                                **{k: (None if v is None else round(v, 5)) if k in ("mean_diff", "ci_low", "ci_high") else v for k, v in r.items()}})
    return comparisons, learned_by_cat


def protocol_reference(protocol: str, runs: Iterable[str]) -> str | None:
    """The reference run of ``protocol`` among ``runs``: ``real-only`` (mixed), ``copy-paste``
    (synthetic), or None when it was not run (then only absolute numbers are reported)."""
    want = BASELINE if protocol == "mixed" else SYNTHETIC_REFERENCE
    return want if want in set(runs) else None


def compare_protocols(rows: Sequence[dict], budget: str, metrics: Sequence[str] = COMPARED_METRICS,
                      confidence: float = 0.95) -> tuple[list[dict], dict, dict]:
    """:func:`compare_runs` per protocol, each against its own reference.

    ``rows`` carry ``protocol`` (absent: ``mixed``). Returns (comparisons, learned, references):
    every comparison row with ``protocol``, ``budget`` and ``reference`` added;
    ``learned[protocol][category]``; ``references[protocol]`` (None: no reference run, no
    comparisons and no sanity check for that protocol).
    """
    comparisons, learned_by, refs = [], {}, {}
    present = {r.get("protocol", "mixed") for r in rows}
    for protocol in [q for q in PROTOCOLS if q in present] + sorted(present - set(PROTOCOLS)):
        mine = [r for r in rows if r.get("protocol", "mixed") == protocol]
        ref = refs[protocol] = protocol_reference(protocol, (r["run"] for r in mine))
        if ref is None:
            learned_by[protocol] = {}
            continue
        c, lrn = compare_runs(mine, metrics, confidence, reference=ref)
        comparisons += [{**r, "protocol": protocol, "budget": budget, "reference": ref} for r in c]
        learned_by[protocol] = {cat: {**info, "protocol": protocol, "budget": budget} for cat, info in lrn.items()}
    return comparisons, learned_by, refs


def absolute_intervals(rows: Iterable[dict], budget: str, metrics: Sequence[str] = COMPARED_METRICS,
                       confidence: float = 0.95) -> list[dict]:
    """Per (protocol, category, defect type, run, metric): the mean over seeds with its 95 %
    t-interval (:func:`t_interval`), the numbers a protocol without a reference is read by."""
    table: dict[tuple, dict[int, float]] = {}
    for r in rows:
        for m in metrics:
            if isinstance(r.get(m), (int, float)) and not isinstance(r.get(m), bool):
                table.setdefault((r.get("protocol", "mixed"), r["category"], r["defect_type"], r["run"], m), {})[int(r["seed"])] = r[m]
    out = []
    for (protocol, cat, dt, run, m), by_seed in sorted(table.items()):
        mean, lo, hi = t_interval([v for _, v in sorted(by_seed.items())], confidence)
        out.append({"protocol": protocol, "budget": budget, "category": cat, "defect_type": dt, "run": run, "metric": m,
                    "mean": round(mean, 5), "ci_low": None if lo is None else round(lo, 5),
                    "ci_high": None if hi is None else round(hi, 5), "n_seeds": len(by_seed)})
    return out

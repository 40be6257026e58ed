"""Paired seed statistics: t-interval on numbers with a known answer, verdicts, the sanity check."""

from __future__ import annotations

import math

import pytest

from defectforge.detector.compare import (
    DID_NOT_LEARN,
    HELPS,
    HURTS,
    NO_EFFECT,
    compare_runs,
    learned,
    paired_interval,
    t_interval,
    verdict,
)
from defectforge.errors import DefectforgeError

# Student t quantiles from a printed table (two-sided 95 %): t_{0.975, 2} and t_{0.975, 4}
T_975_DF2 = 4.302652729749464
T_975_DF4 = 2.7764451051977987


def test_t_interval_by_hand():
    # diffs 1, 2, 3: mean 2, sample sd 1 (ddof 1), se = 1/sqrt(3), half-width = t_{0.975,2} / sqrt(3)
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # 2.4841
    assert mean == pytest.approx(2.0)
    assert lo == pytest.approx(2.0 - half, abs=1e-9) and hi == pytest.approx(2.0 + half, abs=1e-9)
    # five values: mean 0.3, sd sqrt(0.025) = 0.1581, half-width = t_{0.975,4} * 0.1581 / sqrt(5) = 0.1963
    mean, lo, hi = t_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = T_975_DF4 * math.sqrt(0.025) / math.sqrt(5)
    assert mean == pytest.approx(0.3) and lo == pytest.approx(0.3 - half, abs=1e-9) and hi == pytest.approx(0.3 + half, abs=1e-9)


def test_paired_interval_is_on_the_differences_not_on_each_run():
    # both runs vary a lot from seed to seed, but the treated run is always exactly 0.1 above, +-0.01
    base = [0.2, 0.5, 0.8]
    treated = [0.31, 0.59, 0.90]  # diffs 0.11, 0.09, 0.10
    r = paired_interval(treated, base)
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert r["mean_diff"] == pytest.approx(0.1)
    assert r["ci_low"] == pytest.approx(0.1 - half) and r["ci_high"] == pytest.approx(0.1 + half)
    assert r["n_seeds"] == 3 and r["verdict"] == HELPS
    with pytest.raises(DefectforgeError, match="pair them by seed"):
        paired_interval([1, 2], [1, 2, 3])


def test_verdicts():
    assert verdict(0.01, 0.2) == HELPS
    assert verdict(-0.2, -0.01) == HURTS
    assert verdict(-0.1, 0.1) == NO_EFFECT
    assert verdict(None, None) == NO_EFFECT
    assert paired_interval([0.1, 0.12, 0.11], [0.3, 0.31, 0.3])["verdict"] == HURTS
    assert paired_interval([0.5, 0.3, 0.7], [0.45, 0.5, 0.5])["verdict"] == NO_EFFECT
    # one seed: no interval, never a verdict either way however large the difference
    one = paired_interval([0.9], [0.1])
    assert one["ci_low"] is None and one["ci_high"] is None and one["verdict"] == NO_EFFECT


def test_learned_rule():
    ok = learned([0.90, 0.92, 0.88])
    assert ok["learned"] and ok["image_auroc_real_only"] == pytest.approx(0.9)
    chance = learned([0.55, 0.50, 0.60])
    assert not chance["learned"] and "below 0.6" in chance["reason"]
    # mean above 0.6, but one seed at chance: the interval reaches below 0.5
    shaky = learned([0.95, 0.40, 0.75])
    assert not shaky["learned"] and "interval" in shaky["reason"]
    assert learned([0.7])["learned"] and not learned([0.59])["learned"]


def _rows(cat, auroc_real, pixel_ap_real, pixel_ap_syn):
    rows = []
    for s, (a, p0, p1) in enumerate(zip(auroc_real, pixel_ap_real, pixel_ap_syn)):
        for dt in ("all", "crack"):
            rows.append({"category": cat, "defect_type": dt, "run": "real-only", "seed": s, "image_auroc": a, "pixel_ap": p0, "aupro": None})
            rows.append({"category": cat, "defect_type": dt, "run": "copy-paste", "seed": s, "image_auroc": a, "pixel_ap": p1, "aupro": None})
    return rows


def test_compare_runs_contract_and_did_not_learn():
    rows = _rows("tile", [0.9, 0.92, 0.91], [0.2, 0.3, 0.4], [0.3, 0.41, 0.49]) + _rows("wood", [0.5, 0.45, 0.55], [0.2, 0.3, 0.4], [0.3, 0.41, 0.49])
    comparisons, learn = compare_runs(rows, metrics=("pixel_ap", "aupro"))
    assert learn["tile"]["learned"] and not learn["wood"]["learned"]
    keys = {"category", "defect_type", "method", "metric", "mean_diff", "ci_low", "ci_high", "n_seeds", "verdict"}
    assert comparisons and all(set(c) == keys for c in comparisons)
    # aupro is None for every seed: no row rather than a made-up number
    assert {c["metric"] for c in comparisons} == {"pixel_ap"}
    tile = [c for c in comparisons if c["category"] == "tile"]
    assert {c["defect_type"] for c in tile} == {"all", "crack"} and all(c["verdict"] == HELPS and c["n_seeds"] == 3 for c in tile)
    assert tile[0]["mean_diff"] == pytest.approx(0.1)
    wood = [c for c in comparisons if c["category"] == "wood"]
    assert wood and all(c["verdict"] == DID_NOT_LEARN for c in wood)
    # seeds are paired by their number, not by position
    shuffled = list(reversed(rows))
    assert compare_runs(shuffled, metrics=("pixel_ap",))[0] == [c for c in comparisons if c["metric"] == "pixel_ap"]


def _protocol_rows():
    # seed s: real-only 0.20 + s/10, mixed copy-paste +0.10, mixed perlin +0.05 (+-0.01), synthetic
    # copy-paste 0.30 + s/10, synthetic perlin 0.30 + s/10 + 0.20 (+-0.01); image AUROC 0.9 everywhere
    rows = []
    for s in range(3):
        wobble = (0.01, -0.01, 0.0)[s]
        for protocol, run, ap in (("mixed", "real-only", 0.2 + s / 10), ("mixed", "copy-paste", 0.3 + s / 10),
                                  ("mixed", "perlin", 0.25 + s / 10 + wobble), ("synthetic", "copy-paste", 0.3 + s / 10),
                                  ("synthetic", "perlin", 0.5 + s / 10 + wobble)):
            rows.append({"category": "tile", "defect_type": "all", "run": run, "seed": s, "protocol": protocol,
                         "image_auroc": 0.9, "pixel_ap": ap})
    return rows


def test_each_protocol_is_compared_with_its_own_reference():
    from defectforge.detector.compare import compare_protocols

    comparisons, learn, refs = compare_protocols(_protocol_rows(), "epochs", metrics=("pixel_ap",))
    assert refs == {"mixed": "real-only", "synthetic": "copy-paste"}
    got = {(c["protocol"], c["method"]): c for c in comparisons}
    # mixed: against real-only (copy-paste and perlin); synthetic: perlin against copy-paste's set only
    assert set(got) == {("mixed", "copy-paste"), ("mixed", "perlin"), ("synthetic", "perlin")}
    assert got[("mixed", "copy-paste")]["mean_diff"] == pytest.approx(0.1) and got[("mixed", "copy-paste")]["reference"] == "real-only"
    assert got[("mixed", "perlin")]["mean_diff"] == pytest.approx(0.05)
    # synthetic perlin - synthetic copy-paste = 0.2 + (0.01, -0.01, 0): mean 0.2, sd 0.01
    syn = got[("synthetic", "perlin")]
    half = T_975_DF2 * 0.01 / math.sqrt(3)
    assert syn["reference"] == "copy-paste" and syn["mean_diff"] == pytest.approx(0.2)
    assert syn["ci_low"] == pytest.approx(0.2 - half, abs=1e-5) and syn["verdict"] == HELPS
    assert all(c["budget"] == "epochs" for c in comparisons)
    assert learn["mixed"]["tile"]["image_auroc_real_only"] == pytest.approx(0.9)
    assert learn["synthetic"]["tile"]["reference"] == "copy-paste" and "copy-paste image AUROC 0.900" in learn["synthetic"]["tile"]["reason"]


def test_synthetic_protocol_without_copy_paste_has_no_reference_and_absolute_numbers():
    from defectforge.detector.compare import absolute_intervals, compare_protocols

    rows = [r for r in _protocol_rows() if not (r["protocol"] == "synthetic" and r["run"] == "copy-paste")]
    comparisons, learn, refs = compare_protocols(rows, "steps", metrics=("pixel_ap",))
    assert refs == {"mixed": "real-only", "synthetic": None} and learn["synthetic"] == {}
    assert {c["protocol"] for c in comparisons} == {"mixed"}
    ab = {(r["protocol"], r["run"]): r for r in absolute_intervals(rows, "steps", metrics=("pixel_ap",))}
    # synthetic perlin: 0.51, 0.59, 0.70: mean 0.6, sd sqrt(((-0.09)^2 + (-0.01)^2 + 0.1^2) / 2) = sqrt(0.0091)
    p = ab[("synthetic", "perlin")]
    half = T_975_DF2 * math.sqrt(0.0091) / math.sqrt(3)
    assert p["mean"] == pytest.approx(0.6) and p["ci_low"] == pytest.approx(0.6 - half, abs=1e-5)
    assert p["ci_high"] == pytest.approx(0.6 + half, abs=1e-5) and p["n_seeds"] == 3 and p["budget"] == "steps"

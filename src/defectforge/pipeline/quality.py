"""Stage ``quality``: per-sample gates and per-set image quality and realism.

Per-sample gates are written per row (failing rows flagged with reasons, never
dropped). Per (category, defect type, method), against the held-out real defects:
FID / KID / IS / LPIPS on crops around the masks (defects are small: on
whole images the background dominates every feature backbone), with the backbone
written beside every number, and the realism scores that need no downloaded weights
(:mod:`defectforge.metrics.realism`). Set-level gates make the stage fail with a
readable report. IC-LPIPS follows AnomalyDiffusion's protocol: its cluster centres
are the real *training* defects of the type (the split's train rows, the images the
generators learned from), not the held-out ones; ``ic_lpips_centres`` in details.json
names the set that gave the centres (``"train"``, or ``"real"`` = the held-out reals
when the type has no training defect).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from defectforge.data.codec import read_image, read_mask
from defectforge.data.files import atomic_write_json, atomic_write_text
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.manifest.schema import QC_COLUMNS
from defectforge.params.quality import QualityParams


class QualityGateError(DefectforgeError):
    """A set-level quality gate failed: the dataset must not be published."""


def _real_defects(split: str | os.PathLike, which: str) -> pd.DataFrame:
    df = read_manifest(split).to_pandas()
    return df[(df["split"] == which) & (df["defect_type"] != "good")]


C2ST_MIN = 4           # crops per side for the classifier two-sample test
REAL_VS_REAL_MIN = 8   # held-out real defects for the real-vs-real reference (two halves of >= 4)


def _real_reference(p: QualityParams, ring: int, src_root: Path, rr: pd.DataFrame) -> dict:
    """Held-out real defects of one type: crops, per-sample realism stats, gate reference, real-vs-real C2ST."""
    from defectforge.metrics.gates import real_reference
    from defectforge.metrics.fidelity import crop_around_mask
    from defectforge.metrics.realism import c2st_accuracy, defect_stats, intensity_distance

    crops, stats = [], []
    for x in rr.sort_values("image_id").itertuples():
        image, mask = read_image(src_root / x.image_path), read_mask(src_root / x.mask_path)
        crops.append(crop_around_mask(image, mask, context=p.crop_context))
        if mask.any():  # some real masks are empty: no defect statistics from them
            stats.append(defect_stats(image, mask, ring=ring))
    out = {"crops": crops, "stats": stats, "gate": real_reference(stats) if stats else None,
           "c2st_real_vs_real": None, "c2st_real_vs_real_skipped": None, "intensity_distance_real_vs_real": None}
    n = len(crops)
    if n < REAL_VS_REAL_MIN:
        out["c2st_real_vs_real_skipped"] = f"needs >= {REAL_VS_REAL_MIN} held-out real defects (two halves), got {n}"
    else:  # two seeded halves of the held-out reals
        perm = np.random.default_rng(p.seed).permutation(n)
        a, b = perm[: n // 2], perm[n // 2 : 2 * (n // 2)]
        res = c2st_accuracy([crops[i] for i in a], [crops[i] for i in b], seed=p.seed, folds=p.c2st_folds, size=p.c2st_size,
                            repeats=p.c2st_repeats)
        out["c2st_real_vs_real"] = round(res["accuracy"], 4)
        if len(stats) >= REAL_VS_REAL_MIN:
            sp = np.random.default_rng(p.seed).permutation(len(stats))
            half = len(stats) // 2
            d = intensity_distance([stats[i] for i in sp[:half]], [stats[i] for i in sp[half : 2 * half]])
            out["intensity_distance_real_vs_real"] = round(d["distance"], 4)
    return out


def _realism(p: QualityParams, ref: dict, crops: list, stats: list[dict], flags: dict[str, list]) -> dict:
    """Per-set realism scores (defectforge.metrics.realism) against the held-out reals of the type."""
    from defectforge.metrics.realism import c2st_accuracy, intensity_distance, pooled_saturation

    r4 = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
    real_stats = ref["stats"] if ref else []
    contrast = [s["contrast"] for s in stats if np.isfinite(s["contrast"])]
    real_contrast = [s["contrast"] for s in real_stats if np.isfinite(s["contrast"])]
    out = {
        "saturation": r4(pooled_saturation(stats)),
        "saturation_real": r4(pooled_saturation(real_stats)),
        "contrast_median": r4(np.median(contrast)) if contrast else None,
        "contrast_real_iqr": [round(float(q), 4) for q in np.percentile(real_contrast, [25, 75])] if real_contrast else None,
        "saturated_samples": r4(np.mean(flags["saturated"])) if flags["saturated"] else None,
        "colour_drift_samples": r4(np.mean(flags["drift"])) if flags["drift"] else None,
        # median in-mask speckle over the reals' median (1: as noisy as real defects of the type)
        "speckle_ratio": r4(np.median([s["speckle"] for s in stats]) / max(float(np.median([s["speckle"] for s in real_stats])), 1.0))
        if stats and real_stats else None,
        "intensity_distance": None, "intensity_per_stat": None, "c2st_accuracy": None, "c2st_ci95": None, "c2st_folds": None,
        "c2st_classifier": None, "c2st_n": None,
        "c2st_real_vs_real": ref["c2st_real_vs_real"] if ref else None,
        "c2st_real_vs_real_skipped": ref["c2st_real_vs_real_skipped"] if ref else "no held-out real defects of the type",
        "intensity_distance_real_vs_real": ref["intensity_distance_real_vs_real"] if ref else None,
    }
    out["saturation_skipped"] = None if stats else "no sample has a non-empty mask"
    if stats and real_stats:
        d = intensity_distance(stats, real_stats)
        out["intensity_distance"] = r4(d["distance"])
        out["intensity_per_stat"] = {k: r4(v) for k, v in d["per_stat"].items()}
        out["intensity_skipped"] = None
    else:
        out["intensity_skipped"] = f"needs samples and real defects with non-empty masks, got {len(stats)} and {len(real_stats)}"
    real_crops = ref["crops"] if ref else []
    if min(len(real_crops), len(crops)) < C2ST_MIN:
        out["c2st_skipped"] = f"needs >= {C2ST_MIN} real and {C2ST_MIN} synthetic crops, got {len(real_crops)} and {len(crops)}"
    else:
        c = c2st_accuracy(real_crops, crops, seed=p.seed, folds=p.c2st_folds, size=p.c2st_size, repeats=p.c2st_repeats)
        out.update(c2st_accuracy=round(c["accuracy"], 4), c2st_ci95=[round(v, 4) for v in c["ci95"]], c2st_folds=[round(f, 4) for f in c["folds"]],
                   c2st_classifier=c["classifier"], c2st_n=c["n_real"], c2st_skipped=None)
    return out


C2ST_COLUMNS = ["set", "category", "defect_type", "method", "c2st_accuracy", "ci_low", "ci_high", "c2st_real_vs_real", "pass_rate", "group", "reference"]


def dvc_metrics(details: dict) -> dict:
    """metrics.json, the quality stage's line in ``dvc metrics show``: a few numbers that fit a terminal.

    ``metric`` names what the method columns hold (``c2st``); ``pass_rate`` over every sample;
    one column per method: its two-sample (real vs synthetic crops) classifier accuracy averaged over
    its sets (0.5: indistinguishable; None where every set skipped it). Every set's scores, with the
    backbones, are in details.json; the accuracy per set with its interval in c2st.csv (the plot)."""
    by_method: dict[str, list[float]] = {}
    for e in (details.get("sets") or {}).values():
        values = by_method.setdefault(e["method"], [])
        if isinstance(e.get("c2st_accuracy"), (int, float)):
            values.append(e["c2st_accuracy"])
    return {"metric": "c2st", "pass_rate": details.get("pass_rate"),
            **{m: (round(float(np.mean(v)), 3) if v else None) for m, v in sorted(by_method.items())}}


def c2st_table(details: dict) -> pd.DataFrame:
    """c2st.csv: per set (category/defect type/method) its two-sample accuracy with the 95 % interval,
    the real-vs-real reference and the set's pass rate (``group``: the method, the plot's colour;
    ``reference``: 0.5, chance, the plot's vertical line); sets that skipped the test are left out."""
    rows = []
    for key, e in (details.get("sets") or {}).items():
        if not isinstance(e.get("c2st_accuracy"), (int, float)):
            continue
        ci = e.get("c2st_ci95") or [None, None]
        rows.append({"set": key, "category": e["category"], "defect_type": e["defect_type"], "method": e["method"],
                     "c2st_accuracy": e["c2st_accuracy"], "ci_low": ci[0], "ci_high": ci[1],
                     "c2st_real_vs_real": e.get("c2st_real_vs_real"), "pass_rate": e.get("pass_rate"), "group": e["method"],
                     "reference": 0.5})
    return pd.DataFrame(rows, columns=C2ST_COLUMNS)


def write_dvc_files(details: dict, out_dir: str | os.PathLike) -> None:
    """What DVC shows of the stage: metrics.json (:func:`dvc_metrics`) and c2st.csv (:func:`c2st_table`)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", dvc_metrics(details))
    c2st_table(details).to_csv(out_dir / "c2st.csv", index=False)


def run(p: QualityParams, split: str | os.PathLike, refined: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """qc.parquet (per-sample gates), details.json (per set), metrics.json / c2st.csv (:func:`write_dvc_files`), gates.json;
    raises QualityGateError.

    Per (category, defect type, method), against the held-out real defects of the type:
    FID / KID / IS / LPIPS, IC-LPIPS around the type's real training defects, and the realism scores of
    :mod:`defectforge.metrics.realism` - ``saturation`` / ``saturation_real`` (pooled
    in-mask saturated share), ``intensity_distance``, ``contrast_median`` /
    ``contrast_real_iqr``, ``c2st_accuracy`` with its references ``c2st_real_vs_real``
    (the held-out reals in two seeded halves) and copy-paste's own ``c2st_accuracy``;
    ``saturated_samples`` / ``colour_drift_samples``: the share of samples that failed
    those per-sample gates.
    """
    from defectforge.metrics.gates import GateThresholds, SetThresholds, thresholds_from_dict

    gates = thresholds_from_dict(p.gates, GateThresholds)
    set_gates = thresholds_from_dict(p.set_gates, SetThresholds)
    out_dir = Path(out_dir)
    from defectforge.manifest.validate import require_kind

    src_root = Path(require_kind(split, "split", "quality --split")["dataset_root"])
    split_df = read_manifest(split).to_pandas().set_index("image_id")
    root = Path(require_kind(refined, "synthetic", "quality --refined")["dataset_root"])
    df = read_manifest(refined).to_pandas().sort_values("sample_id")
    # 1. the held-out real defects of every type there are samples of, and the training ones (IC-LPIPS centres)
    refs, centres = _references(p, split, src_root, df, gates.ring)
    # 2. per sample: gates (saturation and colour drift against the reals' reference) and realism stats
    qc, crops, stats, flags = _gate_samples(p, df, refs, split_df, src_root, root, gates, progress)
    # 3. per set: FID / KID / LPIPS and the realism scores; set-level gates
    sets, failures = _score_sets(p, df, qc, crops, refs, centres, stats, flags, set_gates)
    metrics = _write_outputs(out_dir, qc, sets, failures)
    if failures:
        raise QualityGateError(f"quality gate failed ({len(failures)}): " + "; ".join(failures) + f" - see {out_dir / 'gates.json'}")
    return metrics


def _references(p: QualityParams, split, src_root: Path, df: pd.DataFrame, ring: int) -> tuple[dict, dict]:
    """Per (category, defect type) of the samples: the held-out reals' reference (None without any)
    and the IC-LPIPS cluster centres (AnomalyDiffusion): crops of the type's real training defects."""
    from defectforge.metrics.fidelity import crop_around_mask

    reals = _real_defects(split, "test")
    refs = {}
    for category, defect in sorted(set(zip(df.category, df.defect_type))):
        rr = reals[(reals["category"] == category) & (reals["defect_type"] == defect)]
        refs[(category, defect)] = None if rr.empty else _real_reference(p, ring, src_root, rr)
    trains = _real_defects(split, "train")
    centres = {}
    for category, defect in refs:
        tr = trains[(trains["category"] == category) & (trains["defect_type"] == defect)].sort_values("image_id")
        centres[(category, defect)] = [
            crop_around_mask(read_image(src_root / x.image_path), read_mask(src_root / x.mask_path), context=p.crop_context)
            for x in tr.itertuples()
        ] or None
    return refs, centres


def _gate_samples(p: QualityParams, df: pd.DataFrame, refs: dict, split_df: pd.DataFrame, src_root: Path, root: Path, gates,
                  progress: bool) -> tuple[pd.DataFrame, dict, dict, dict]:
    """(the qc table, and per (category, defect type, method): the samples' crops, their realism
    stats and their saturation / colour-drift flags)."""
    from tqdm import tqdm

    from defectforge.metrics.gates import gate_sample
    from defectforge.metrics.fidelity import crop_around_mask
    from defectforge.metrics.realism import defect_stats

    qc_rows, crops, stats = [], {}, {}
    flags: dict = {}
    for r in tqdm(df.itertuples(), total=len(df), desc="quality: per-sample gates", disable=not progress):
        key = (r.category, r.defect_type, r.method)
        ref = refs[key[:2]]
        normal = read_image(src_root / split_df.loc[r.source_image_id, "image_path"])
        image = read_image(root / r.image_path)
        raw = read_mask(root / r.raw_mask_path)
        mask = read_mask(root / r.mask_path)
        attention = None
        if isinstance(r.attention_path, str):
            attention = np.asarray(read_image(root / r.attention_path)[..., 0], np.float32) / 255.0
        qc, passed, reasons = gate_sample(normal, image, raw, mask if r.mask_source != "raw" else None, attention, gates,
                                          real=ref["gate"] if ref else None)
        if r.mask_source == "raw-fallback":
            passed, reasons = False, reasons + ["neither attention (Eq. 13) nor the image difference located the defect; raw target mask kept"]
        qc_rows.append({"sample_id": r.sample_id, **{k: qc.get(k) for k in QC_COLUMNS if k in qc}, "qc_pass": bool(passed), "qc_reasons": list(reasons)})
        crops.setdefault(key, []).append(crop_around_mask(image, mask, context=p.crop_context))
        f = flags.setdefault(key, {"saturated": [], "drift": []})
        if mask.any():
            stats.setdefault(key, []).append(defect_stats(image, mask, ring=gates.ring, reference=normal))
        if qc["qc_saturated"] is not None:
            f["saturated"].append(bool(qc["qc_saturated"]))
            f["drift"].append(bool(qc["qc_colour_drift"]))
    return pd.DataFrame(qc_rows), crops, stats, flags


def _score_sets(p: QualityParams, df: pd.DataFrame, qc: pd.DataFrame, crops: dict, refs: dict, centres: dict, stats: dict,
                flags: dict, set_gates) -> tuple[list[dict], list[str]]:
    """Per (category, defect type, method): FID / KID / IS / LPIPS against the held-out reals, the
    realism scores and the pass rate; and the set-level gates' failures."""
    from dataclasses import replace

    from defectforge.metrics.gates import gate_set
    from defectforge.metrics.fidelity import compute_fidelity

    sets, failures = [], []
    only_realism = replace(set_gates, kid_max=None, fid_max=None, lpips_min=None, c2st_max=None,
                           intensity_distance_max=None, min_pass_rate=None)
    for (category, defect, method), fake in sorted(crops.items()):
        ref = refs[(category, defect)]
        if ref is None:
            entry = {"quality_skipped": f"no held-out real {category}/{defect} images to compare with"}
        else:
            entry = compute_fidelity(ref["crops"], fake, backbone=p.backbone, weights=p.weights, lpips_backbone=p.lpips_backbone,
                                    lpips_weights=p.lpips_weights, size=p.size,
                                    centres=centres[(category, defect)], centres_name="train")
        entry.update(_realism(p, ref, fake, stats.get((category, defect, method), []), flags[(category, defect, method)]))
        ids = df[(df.category == category) & (df.defect_type == defect) & (df.method == method)].sample_id
        pass_rate = float(qc.set_index("sample_id").loc[ids, "qc_pass"].mean())
        entry = {"category": category, "defect_type": defect, "method": method, "pass_rate": round(pass_rate, 4), **entry}
        sets.append(entry)
        # without held-out reals only the checks that need none (saturation, colour drift)
        failures += gate_set(entry, pass_rate, set_gates if "quality_skipped" not in entry else only_realism,
                             label=f"{category}/{defect}/{method}")
    return sets, failures


def _write_outputs(out_dir: Path, qc: pd.DataFrame, sets: list[dict], failures: list[str]) -> dict:
    """qc.parquet, details.json, the DVC files and gates.json; returns the details."""
    out_dir.mkdir(parents=True, exist_ok=True)
    qc_path = out_dir / "qc.parquet"
    tmp = out_dir / ".qc.parquet.tmp"
    qc.to_parquet(tmp, index=False)
    os.replace(tmp, qc_path)
    # keyed (not a list) so `dvc metrics show` can flatten it into a table
    metrics = {
        "sets": {f"{e['category']}/{e['defect_type']}/{e['method']}": e for e in sets},
        "pass_rate": round(float(qc["qc_pass"].mean()), 4),
        "samples": int(len(qc)),
    }
    atomic_write_json(out_dir / "details.json", metrics)
    write_dvc_files(metrics, out_dir)
    atomic_write_text(out_dir / "gates.json", json.dumps({"passed": not failures, "failures": failures}, indent=2) + "\n")
    return metrics

"""The refine, quality and detector stages: from generated samples to measured ones.

* :func:`run_refine` — the mask that goes into the dataset: Eq. 13 of the
  DDIM-inversion paper from the defect tokens' cross-attention where a method saved
  one, the raw target mask otherwise (the raw mask stays in the manifest beside it).
* :func:`run_quality` — per-sample gates (written per row, failing rows flagged with
  reasons, never dropped) and per (category, defect type, method) FID / KID / IS /
  LPIPS / IC-LPIPS against the held-out real defects, computed on crops around the
  masks (defects are small: on whole images the background dominates every feature
  backbone). The backbone is written beside every number. Set-level gates make the
  stage fail with a readable report.
* :func:`run_detector` — the U-Net trained on the real training split alone
  (``real-only``) and with each method's synthetic samples, paired by seed (same
  weights, data order and budget) over several seeds, evaluated on the held-out real
  test split; mean paired differences with 95 % intervals and verdicts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from defectforge.data.io import atomic_write_text, encode_png, atomic_write_bytes, read_image, read_mask, sha256_bytes
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.schema import QC_COLUMNS
from defectforge.manifest.validate import check_manifest
from defectforge.params import DetectorParams, QualityParams, RefineParams


class QualityGateError(DefectforgeError):
    """A set-level quality gate failed: the dataset must not be published."""


# ----------------------------------------------------------------------------- refine
def run_refine(p: RefineParams, split: str | os.PathLike, generated: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Refined masks into ``out_dir``; returns its manifest (root: the common parent folder).

    Per sample (``mask_source`` records which rule made the mask):

    1. ``attention`` - Eq. 13: the defect tokens' cross-attention, resized, thresholded
       at ``threshold`` inside the target mask, light morphology; accepted when it keeps
       at least ``min_area_ratio`` of the target mask;
    2. ``difference`` - otherwise (``fallback: difference``): where the generation
       actually changed the normal image inside the target mask. Needed when the
       joint softmax was never trained (``finetune.attention_loss: 0``): the defect
       tokens' share is then flat at about 1/2 and Eq. 13 keeps all or nothing
       (docs/eq13-attention.md);
    3. ``raw-fallback`` - neither found anything: the raw target mask is kept and the
       quality stage flags the sample;
    4. ``raw`` - the method saved no attention (copy-paste: its mask is exact).
    """
    from defectforge.masks.refine import difference_mask, refine_mask

    generated, out_dir = Path(generated), Path(out_dir)
    gen_root = Path(manifest_info(generated)["dataset_root"])
    src_root = Path(manifest_info(split)["dataset_root"])
    sources = read_manifest(split, columns=["image_id", "image_path"]).to_pandas().set_index("image_id")["image_path"]
    root = Path(os.path.commonpath([gen_root.resolve(), out_dir.resolve()]))
    df = read_manifest(generated).to_pandas().sort_values("sample_id").reset_index(drop=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for r in df.to_dict(orient="records"):
        raw = read_mask(gen_root / r["raw_mask_path"])
        for col in ("image_path", "raw_mask_path", "attention_path"):
            r[col] = os.path.relpath(gen_root / r[col], root) if isinstance(r.get(col), str) else None
        source, mask = "raw", raw
        if r["attention_path"] is not None:
            enough = lambda m: m.sum() >= max(1, p.min_area_ratio * raw.sum())  # noqa: E731
            attention = np.asarray(read_image(root / r["attention_path"])[..., 0], np.float32) / 255.0
            mask, source = _with_morphology(lambda rad: refine_mask(attention, raw, threshold=p.threshold, radius=rad), p.radius, enough), "attention"  # Eq. 13
            if not enough(mask) and p.fallback == "difference":
                normal, image = read_image(src_root / sources.loc[r["source_image_id"]]), read_image(root / r["image_path"])
                mask = _with_morphology(lambda rad: difference_mask(normal, image, raw, fraction=p.difference_fraction, radius=rad), p.radius, enough)
                source = "difference"
            if not enough(mask):
                mask, source = raw, "raw-fallback"
        rel = Path(r["method"]) / "masks" / r["category"] / r["defect_type"] / f"{r['sample_id']}.png"
        data = encode_png(mask)
        atomic_write_bytes(tmp / rel, data)
        r.update(mask_path=os.path.relpath(out_dir / rel, root), mask_sha256=sha256_bytes(data), mask_area=int(mask.sum()), mask_source=source)
        rows.append(r)
    # tmp and out_dir are siblings under root, so the stored relative root stays right after the rename
    write_manifest(rows, tmp / "manifest.parquet", kind="synthetic", dataset_root=root)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    final = out_dir / "manifest.parquet"
    check_manifest(final)
    return final


def _with_morphology(make, radius: int, enough) -> np.ndarray:
    """``make(radius)``; if the morphology erased a thin defect (a crack, a scratch), ``make(0)``."""
    mask = make(radius)
    return mask if enough(mask) or radius == 0 else make(0)


# ----------------------------------------------------------------------------- quality
def _real_defects(split: str | os.PathLike, which: str) -> pd.DataFrame:
    df = read_manifest(split).to_pandas()
    return df[(df["split"] == which) & (df["defect_type"] != "good")]


C2ST_MIN = 4           # crops per side for the classifier two-sample test
REAL_VS_REAL_MIN = 8   # held-out real defects for the real-vs-real reference (two halves of >= 4)
HEADLINE = ("fid", "kid_mean", "lpips", "ic_lpips", "is_mean", "pass_rate", "backbone", "lpips_backbone", "quality_skipped",
            "saturation", "saturation_real", "intensity_distance", "contrast_median", "c2st_accuracy", "c2st_real_vs_real",
            "saturated_samples", "colour_drift_samples", "intensity_distance_real_vs_real")


def _real_reference(p: QualityParams, ring: int, src_root: Path, rr: pd.DataFrame) -> dict:
    """Held-out real defects of one type: crops, per-sample realism stats, gate reference, real-vs-real C2ST."""
    from defectforge.metrics.gates import real_reference
    from defectforge.metrics.quality import crop_around_mask
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
        res = c2st_accuracy([crops[i] for i in a], [crops[i] for i in b], seed=p.seed, folds=p.c2st_folds, size=p.c2st_size)
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
        "intensity_distance": None, "intensity_per_stat": None, "c2st_accuracy": None, "c2st_folds": None,
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
        c = c2st_accuracy(real_crops, crops, seed=p.seed, folds=p.c2st_folds, size=p.c2st_size)
        out.update(c2st_accuracy=round(c["accuracy"], 4), c2st_folds=[round(f, 4) for f in c["folds"]],
                   c2st_classifier=c["classifier"], c2st_n=c["n_real"], c2st_skipped=None)
    return out


def run_quality(p: QualityParams, split: str | os.PathLike, refined: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> dict:
    """qc.parquet (per-sample gates), details.json / metrics.json (per set), gates.json; raises QualityGateError.

    Per (category, defect type, method), against the held-out real defects of the type:
    FID / KID / IS / LPIPS / IC-LPIPS and the realism scores of
    :mod:`defectforge.metrics.realism` - ``saturation`` / ``saturation_real`` (pooled
    in-mask saturated share), ``intensity_distance``, ``contrast_median`` /
    ``contrast_real_iqr``, ``c2st_accuracy`` with its references ``c2st_real_vs_real``
    (the held-out reals in two seeded halves) and copy-paste's own ``c2st_accuracy``;
    ``saturated_samples`` / ``colour_drift_samples``: the share of samples that failed
    those per-sample gates.
    """
    from dataclasses import replace

    from tqdm import tqdm

    from defectforge.metrics.gates import GateThresholds, SetThresholds, gate_sample, gate_set, thresholds_from_dict
    from defectforge.metrics.quality import compute_quality, crop_around_mask
    from defectforge.metrics.realism import defect_stats

    gates = thresholds_from_dict(p.gates, GateThresholds)
    set_gates = thresholds_from_dict(p.set_gates, SetThresholds)
    out_dir = Path(out_dir)
    src_root = Path(manifest_info(split)["dataset_root"])
    split_df = read_manifest(split).to_pandas().set_index("image_id")
    root = Path(manifest_info(refined)["dataset_root"])
    df = read_manifest(refined).to_pandas().sort_values("sample_id")
    # 1. the held-out real defects of every type there are samples of
    reals = _real_defects(split, "test")
    refs = {}
    for category, defect in sorted(set(zip(df.category, df.defect_type))):
        rr = reals[(reals["category"] == category) & (reals["defect_type"] == defect)]
        refs[(category, defect)] = None if rr.empty else _real_reference(p, gates.ring, src_root, rr)
    # 2. per sample: gates (saturation and colour drift against the reals' reference) and realism stats
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
    qc = pd.DataFrame(qc_rows)
    # 3. per set: FID / KID / LPIPS and the realism scores; set-level gates
    sets, failures = [], []
    only_realism = replace(set_gates, kid_max=None, fid_max=None, lpips_min=None, c2st_max=None,
                           intensity_distance_max=None, min_pass_rate=None)
    for (category, defect, method), fake in sorted(crops.items()):
        ref = refs[(category, defect)]
        if ref is None:
            entry = {"quality_skipped": f"no held-out real {category}/{defect} images to compare with"}
        else:
            entry = compute_quality(ref["crops"], fake, backbone=p.backbone, weights=p.weights, lpips_backbone=p.lpips_backbone, lpips_weights=p.lpips_weights, size=p.size)
        entry.update(_realism(p, ref, fake, stats.get((category, defect, method), []), flags[(category, defect, method)]))
        ids = df[(df.category == category) & (df.defect_type == defect) & (df.method == method)].sample_id
        pass_rate = float(qc.set_index("sample_id").loc[ids, "qc_pass"].mean())
        entry = {"category": category, "defect_type": defect, "method": method, "pass_rate": round(pass_rate, 4), **entry}
        sets.append(entry)
        # without held-out reals only the checks that need none (saturation, colour drift)
        failures += gate_set(entry, pass_rate, set_gates if "quality_skipped" not in entry else only_realism,
                             label=f"{category}/{defect}/{method}")
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
    atomic_write_text(out_dir / "details.json", json.dumps(metrics, indent=2, sort_keys=True, default=_json) + "\n")
    short = {**metrics, "sets": {k: {h: e[h] for h in HEADLINE if h in e} for k, e in metrics["sets"].items()}}
    atomic_write_text(out_dir / "metrics.json", json.dumps(short, indent=2, sort_keys=True, default=_json) + "\n")
    atomic_write_text(out_dir / "gates.json", json.dumps({"passed": not failures, "failures": failures}, indent=2) + "\n")
    if failures:
        raise QualityGateError(f"quality gate failed ({len(failures)}): " + "; ".join(failures) + f" - see {out_dir / 'gates.json'}")
    return metrics


def _json(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.bool_):
        return bool(v)
    raise TypeError(type(v))


# ----------------------------------------------------------------------------- detector
def run_detector(
    p: DetectorParams,
    split: str | os.PathLike,
    refined: str | os.PathLike | list,
    qc: str | os.PathLike | list | None,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
) -> dict:
    """Paired multi-seed detector runs per category; details.json, metrics.json, curves.csv.

    For every category and every seed in ``p.seeds``: one U-Net on the real training split
    alone (``real-only``) and one per method on real + that method's synthetic samples,
    from the same initial weights, the same order of real images and the same step budget
    (:func:`~defectforge.detector.train.train_detector`). Each model is evaluated on the
    held-out real test split (``all``) and per defect type (that type's defect images plus
    every defect-free test image). :func:`~defectforge.detector.compare.compare_runs` turns
    the per-seed numbers into paired mean differences with 95 % t-intervals and verdicts,
    after the sanity check that the real-only detector learned.

    ``refined`` / ``qc``: one synthetic manifest and its qc table, or lists of them (e.g.
    one refined manifest per method); ``qc=None`` uses the manifests' own ``qc_pass``
    column where it has one. details.json holds ``comparisons``, ``learned``,
    ``per_category`` (means over seeds, ``all`` test set), ``per_defect_type``, ``runs``
    (every seed), ``mean`` and ``budget``; metrics.json is flat for ``dvc metrics show``.
    """
    from defectforge.detector import evaluate_groups, prepare_items, train_detector
    from defectforge.detector.compare import BASELINE, COMPARED_METRICS, compare_runs

    out_dir = Path(out_dir)
    src_root = Path(manifest_info(split)["dataset_root"])
    sp = read_manifest(split).to_pandas()
    syn = _synthetic_for_detector(p, refined, qc)
    results, per_type, rows, curves = {}, {}, [], []
    for category in sorted(sp["category"].unique()):
        c = sp[sp["category"] == category]
        tr = c[c["split"] == "train"]
        good = tr[tr["defect_type"] == "good"]
        if p.max_train_good is not None and len(good) > p.max_train_good:
            # one fixed subset (random_state 0) for every seed and run: the seeds vary the model, not the data
            tr = pd.concat([tr[tr["defect_type"] != "good"], good.sample(n=p.max_train_good, random_state=0)])
        te = c[c["split"] == "test"]
        test = _load_pairs(src_root, te)
        if not any(m.any() for _, m in test):
            results[category] = {"skipped": f"category {category!r} has no held-out real defect images to evaluate on"}
            continue
        train_real = prepare_items(_load_pairs(src_root, tr), p.size, f"{category} real training images", scale=p.scale)
        test_t = prepare_items(test, p.size, f"{category} test images", scale=p.scale)
        types = list(te["defect_type"])
        groups = {"all": None, **{t: [i for i, d in enumerate(types) if d in (t, "good")] for t in sorted(set(types) - {"good"})}}
        runs = {BASELINE: None}
        for method in sorted(syn["method"].unique()):
            s = syn[(syn["category"] == category) & (syn["method"] == method)]
            if len(s):
                runs[method] = prepare_items([(read_image(Path(r.abs_image)), read_mask(Path(r.abs_mask))) for r in s.itertuples()], p.size, f"{category}/{method} synthetic samples", scale=p.scale)
        for seed in p.seeds:
            for run, extra in runs.items():
                label = f"{category}/{run}/seed {seed}"
                model, curve = train_detector(
                    train_real, synthetic_items=extra, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=seed, size=p.size,
                    scale=p.scale, patch=p.patch, base_channels=p.base_channels, depth=p.depth, norm=p.norm, score_pool=p.score_pool,
                )
                for dt, m in evaluate_groups(model, test_t, groups).items():
                    rows.append({"category": category, "defect_type": dt, "run": run, "seed": seed,
                                 **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()},
                                 "train_real": len(train_real), "train_synthetic": 0 if extra is None else len(extra),
                                 "seconds": round(sum(r["seconds"] for r in curve), 2)})
                    if dt == "all" and progress:
                        print(f"detector[{label}] loss {curve[-1]['loss']:.4f}; image AUROC {m['image_auroc']}, pixel AP {m['pixel_ap']}, AUPRO {m['aupro']}", flush=True)
                curves += [{"category": category, "run": run, "seed": seed, "epoch": r["epoch"], "step": r["step"],
                            "loss": round(float(r["loss"]), 5), "lr": r["lr"]} for r in curve]
        mine = [r for r in rows if r["category"] == category]
        results[category] = {run: _seed_summary([r for r in mine if r["run"] == run and r["defect_type"] == "all"]) for run in runs}
        per_type[category] = {dt: {run: _seed_summary([r for r in mine if r["run"] == run and r["defect_type"] == dt]) for run in runs} for dt in groups if dt != "all"}
    comparisons, learned = compare_runs(rows)
    for category, r in results.items():
        if "skipped" in r:
            learned[category] = {"learned": False, "reason": r["skipped"], "image_auroc_real_only": None, "image_auroc_ci_low": None, "n_seeds": 0}
    summary = _mean_over_categories(results)
    details = {"comparisons": comparisons, "learned": learned, "per_category": results, "per_defect_type": per_type,
               "runs": rows, "mean": summary, "budget": p.model_dump(mode="json")}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "details.json", json.dumps(details, indent=2, sort_keys=True, default=_json) + "\n")
    # metrics.json (what `dvc metrics show` prints): flat, one row per category/method on the whole test set
    flat: dict[str, dict] = {}
    for category, r in results.items():
        if BASELINE in r:
            flat[f"{category}/{BASELINE}"] = {**{k: r[BASELINE].get(k) for k in COMPARED_METRICS}, "learned": learned[category]["learned"]}
    for c in comparisons:
        if c["defect_type"] == "all":
            e = flat.setdefault(f"{c['category']}/{c['method']}", {})
            m = c["metric"]
            e.update({f"{m}_diff": c["mean_diff"], f"{m}_ci_low": c["ci_low"], f"{m}_ci_high": c["ci_high"], f"{m}_verdict": c["verdict"]})
    atomic_write_text(out_dir / "metrics.json", json.dumps(flat, indent=2, sort_keys=True) + "\n")
    pd.DataFrame(curves, columns=["category", "run", "seed", "epoch", "step", "loss", "lr"]).to_csv(out_dir / "curves.csv", index=False)
    return details


def _load_pairs(root: Path, rows: pd.DataFrame) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, mask) pairs of split rows; defect-free images get an empty mask."""
    out = []
    for r in rows.itertuples():
        im = read_image(root / r.image_path)
        out.append((im, read_mask(root / r.mask_path) if isinstance(r.mask_path, str) else np.zeros(im.shape[:2], bool)))
    return out


def _synthetic_for_detector(p: DetectorParams, refined, qc) -> pd.DataFrame:
    """Synthetic rows (absolute ``abs_image`` / ``abs_mask``) of one or several manifests, qc-filtered."""
    manifests = list(refined) if isinstance(refined, (list, tuple)) else [refined]
    qcs = list(qc) if isinstance(qc, (list, tuple)) else [qc] * len(manifests)
    if len(qcs) != len(manifests):
        raise DefectforgeError(f"detector: {len(manifests)} synthetic manifests but {len(qcs)} qc tables")
    frames = []
    for man, q in zip(manifests, qcs):
        root = Path(manifest_info(man)["dataset_root"])
        df = read_manifest(man).to_pandas()
        if q is not None:
            df = df.drop(columns=["qc_pass"], errors="ignore").merge(pd.read_parquet(q)[["sample_id", "qc_pass"]], on="sample_id", how="left")
        if p.synthetic == "qc_pass" and "qc_pass" in df:
            df = df[df["qc_pass"].fillna(q is None).astype(bool)]  # own column without a qc table: unknown rows stay
        mask_col = df["mask_path"].where(df["mask_path"].notna(), df.get("raw_mask_path"))
        frames.append(df.assign(abs_image=[str(root / x) for x in df["image_path"]], abs_mask=[str(root / x) for x in mask_col]))
    syn = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["category", "method", "abs_image", "abs_mask"])
    return syn.sort_values(["method", "category", "sample_id"]) if len(syn) else syn


def _seed_summary(rows: list[dict]) -> dict:
    """Mean (and ``<key>_std`` over seeds) of every metric, plus the training-set sizes."""
    if not rows:
        return {}
    out: dict = {"n_seeds": len(rows), "seeds": [r["seed"] for r in rows], "train_real": rows[0]["train_real"], "train_synthetic": rows[0]["train_synthetic"],
                 "n_images": rows[0].get("n_images"), "n_defect_images": rows[0].get("n_defect_images")}
    for k in KEYS:
        v = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        out[k] = round(float(np.mean(v)), 4) if v else None
        out[f"{k}_std"] = round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None
    return out


KEYS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")


def _mean_over_categories(results: dict) -> dict:
    runs: dict[str, dict[str, list[float]]] = {}
    for per_run in results.values():
        for run, m in per_run.items():
            if not isinstance(m, dict):
                continue
            for k in KEYS:
                if isinstance(m.get(k), (int, float)):
                    runs.setdefault(run, {}).setdefault(k, []).append(m[k])
    return {run: {k: round(float(np.mean(v)), 4) for k, v in ms.items()} for run, ms in runs.items()}

"""Stage ``detector``: does the synthetic data help a defect detector?

The U-Net is trained on the real training split alone (``real-only``) and with each
method's synthetic samples, paired by seed (same weights, data order and budget)
over several seeds, and evaluated on the held-out real test split; mean paired
differences with 95 % intervals and verdicts (:mod:`defectforge.detector.compare`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from defectforge.config import DetectorParams
from defectforge.data.io import atomic_write_json, read_image, read_mask
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.metrics.detection import DETECTION_KEYS
from defectforge.pipeline.parallel import spawn_map


def run(
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
    from defectforge.detector import prepare_items
    from defectforge.detector.compare import BASELINE, COMPARED_METRICS, compare_runs

    from defectforge.pipeline.entry import pin_cpu_isa

    pin_cpu_isa()  # the kernels of the DVC stage (and of the workers), when nothing has computed yet
    out_dir = Path(out_dir)
    src_root = Path(manifest_info(split)["dataset_root"])
    sp = read_manifest(split).to_pandas()
    syn = _synthetic_for_detector(p, refined, qc)
    results, per_type, rows, curves = {}, {}, [], []
    prepared, jobs = {}, []  # category -> (train_real, test_t, groups, runs); (category, seed, run) in run order
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
        prepared[category] = (train_real, test_t, groups, runs)
        jobs += [(category, seed, run) for seed in p.seeds for run in runs]

    def job_args(job):
        category, seed, run = job
        train_real, test_t, groups, runs = prepared[category]
        return p, train_real, runs[run], test_t, groups, seed

    # every (category, seed, run) is one independent training: on p.workers processes, in order
    for (category, seed, run), (evaluated, curve) in zip(jobs, spawn_map(_train_and_evaluate, map(job_args, jobs), p.workers, len(jobs))):
        train_real, extra = prepared[category][0], prepared[category][3][run]
        # no training time in the rows: details.json feeds the release, which must not
        # change with the machine's speed (docs/reproducibility.md); it goes to the log
        for dt, m in evaluated.items():
            rows.append({"category": category, "defect_type": dt, "run": run, "seed": seed,
                         **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()},
                         "train_real": len(train_real), "train_synthetic": 0 if extra is None else len(extra)})
            if dt == "all" and progress:
                print(f"detector[{category}/{run}/seed {seed}] loss {curve[-1]['loss']:.4f}; image AUROC {m['image_auroc']}, pixel AP {m['pixel_ap']}, "
                      f"AUPRO {m['aupro']}; {sum(r['seconds'] for r in curve):.1f} s", flush=True)
        curves += [{"category": category, "run": run, "seed": seed, "epoch": r["epoch"], "step": r["step"],
                    "loss": round(float(r["loss"]), 5), "lr": r["lr"]} for r in curve]
    for category, (_, _, groups, runs) in prepared.items():
        mine = [r for r in rows if r["category"] == category]
        results[category] = {run: _seed_summary([r for r in mine if r["run"] == run and r["defect_type"] == "all"]) for run in runs}
        per_type[category] = {dt: {run: _seed_summary([r for r in mine if r["run"] == run and r["defect_type"] == dt]) for run in runs} for dt in groups if dt != "all"}
    comparisons, learned = compare_runs(rows)
    for category, r in results.items():
        if "skipped" in r:
            learned[category] = {"learned": False, "reason": r["skipped"], "image_auroc_real_only": None, "image_auroc_ci_low": None, "n_seeds": 0}
    summary = _mean_over_categories(results)
    details = {"comparisons": comparisons, "learned": learned, "per_category": results, "per_defect_type": per_type,
               "runs": rows, "mean": summary, "budget": p.model_dump(mode="json", exclude={"workers"})}  # workers: same numbers
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "details.json", details)
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
    atomic_write_json(out_dir / "metrics.json", flat)
    pd.DataFrame(curves, columns=["category", "run", "seed", "epoch", "step", "loss", "lr"]).to_csv(out_dir / "curves.csv", index=False)
    return details


def _train_and_evaluate(p: DetectorParams, train_real, extra, test_t, groups, seed: int):
    """One paired run: the detector trained on ``train_real`` (+ ``extra``) with ``seed``,
    evaluated on every test group; (metrics per group, training curve)."""
    from defectforge.detector import evaluate_groups, train_detector

    model, curve = train_detector(
        train_real, synthetic_items=extra, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=seed, size=p.size,
        scale=p.scale, patch=p.patch, base_channels=p.base_channels, depth=p.depth, norm=p.norm, score_pool=p.score_pool,
    )
    return evaluate_groups(model, test_t, groups), curve


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
    for k in DETECTION_KEYS:
        v = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
        out[k] = round(float(np.mean(v)), 4) if v else None
        out[f"{k}_std"] = round(float(np.std(v, ddof=1)), 4) if len(v) > 1 else None
    return out



def _mean_over_categories(results: dict) -> dict:
    runs: dict[str, dict[str, list[float]]] = {}
    for per_run in results.values():
        for run, m in per_run.items():
            if not isinstance(m, dict):
                continue
            for k in DETECTION_KEYS:
                if isinstance(m.get(k), (int, float)):
                    runs.setdefault(run, {}).setdefault(k, []).append(m[k])
    return {run: {k: round(float(np.mean(v)), 4) for k, v in ms.items()} for run, ms in runs.items()}

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

from defectforge.data.codec import read_image, read_mask
from defectforge.data.files import atomic_write_json
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest, read_parquet_schema
from defectforge.metrics.detection import DETECTION_KEYS
from defectforge.params.detector import DetectorParams
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
    """Paired multi-seed detector runs per category; details.json, metrics.json, curves.csv, delta_pixel_ap.csv.

    For every category and every seed in ``p.seeds``, by ``p.protocol``: ``mixed`` (the
    DDIM-inversion paper's, Sec. 4.3): one U-Net on the real training split alone
    (``real-only``, the reference) and one per method on real + that method's synthetic
    samples; ``synthetic`` (AnomalyDiffusion's, "Anomaly generation for anomaly detection"):
    one per method on its synthetic samples + the real defect-free training images only, no
    real defect image (reference: copy-paste's set when copy-paste is among the methods, else
    none: absolute numbers only); ``both``: the two. All from the same initial weights, the
    same order of real images and the same budget rule ``p.budget``: ``steps`` (the same
    number of steps for every run, counted from the whole real training split) or ``epochs``
    (``p.epochs`` passes over each run's own training union)
    (:func:`~defectforge.detector.train.train_detector`). Each model is evaluated on the
    held-out real test split (``all``) and per defect type (that type's defect images plus
    every defect-free test image). :func:`~defectforge.detector.compare.compare_runs` turns
    the per-seed numbers into paired mean differences with 95 % t-intervals and verdicts,
    after the sanity check that the reference detector learned, per protocol
    (:func:`~defectforge.detector.compare.compare_protocols`).

    ``refined`` / ``qc``: one synthetic manifest and its qc table, or lists of them (e.g.
    one refined manifest per method); ``qc=None`` uses the manifests' own ``qc_pass``
    column where it has one. details.json holds ``protocol``, ``protocols``, ``references``
    (per protocol, None: no reference), ``training_budget`` (steps | epochs),
    ``comparisons`` (each with its ``protocol``, ``budget`` and ``reference``), ``learned``
    (of the first protocol run), ``learned_by_protocol``, ``absolute`` (mean and 95 %
    interval of every run), ``per_category`` (means over seeds, ``all`` test set, keyed by
    :func:`run_label`), ``per_defect_type``, ``runs`` (every seed, with ``protocol``,
    ``budget`` and ``steps``), ``mean`` and ``budget`` (the params); metrics.json, curves.csv and delta_pixel_ap.csv:
    :func:`write_dvc_files`.
    """
    import defectforge.detector.resolution  # noqa: F401 - the detector's modules load before the ISA pin, as they always have
    from defectforge.detector.compare import absolute_intervals
    from defectforge.pipeline.entry import pin_cpu_isa

    pin_cpu_isa()  # the kernels of the DVC stage (and of the workers), when nothing has computed yet
    from defectforge.manifest.validate import require_kind

    out_dir = Path(out_dir)
    src_root = Path(require_kind(split, "split", "detector --split")["dataset_root"])
    sp = read_manifest(split).to_pandas()
    syn = _synthetic_for_detector(p, refined, qc)
    results, per_type = {}, {}
    prepared, jobs = {}, []  # category -> (train_real, test_t, groups, runs); (category, seed, run) in run order
    resolved, resolution = {}, {}  # category -> its DetectorParams with auto resolved; what was chosen and from what
    for category in sorted(sp["category"].unique()):
        made = _prepare_category(p, category, sp[sp["category"] == category], syn, src_root, progress)
        if isinstance(made, str):
            results[category] = {"skipped": made}
            continue
        resolved[category], resolution[category], prepared[category] = made
        jobs += [(category, seed, run) for seed in p.seeds for run in prepared[category][3]]
    rows, curves = _train_jobs(p, jobs, prepared, resolved, progress)
    for category, (_, _, groups, runs) in prepared.items():
        mine = [r for r in rows if r["category"] == category]
        results[category] = {run_label(*k): _seed_summary([r for r in mine if (r["protocol"], r["run"]) == k and r["defect_type"] == "all"]) for k in runs}
        per_type[category] = {dt: {run_label(*k): _seed_summary([r for r in mine if (r["protocol"], r["run"]) == k and r["defect_type"] == dt]) for k in runs}
                              for dt in groups if dt != "all"}
    comparisons, learned_by, references = _compare(p, rows, results)
    # learned: the sanity check of the first protocol run (mixed's real-only when it ran); all of them in learned_by_protocol
    learned = next(iter(learned_by.values()), {})
    summary = _mean_over_categories(results)
    details = {"protocol": p.protocol, "protocols": list(references), "references": references, "training_budget": p.budget,
               "comparisons": comparisons, "learned": learned, "learned_by_protocol": learned_by,
               "absolute": absolute_intervals(rows, p.budget), "per_category": results, "per_defect_type": per_type,
               "runs": rows, "mean": summary, "budget": p.model_dump(mode="json", exclude={"workers"}),  # workers: same numbers
               "resolution": resolution}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "details.json", details)
    write_dvc_files(details, curves, out_dir)
    return details


def _prepare_category(p: DetectorParams, category: str, c: pd.DataFrame, syn: pd.DataFrame, src_root: Path, progress: bool):
    """One category's training and test items and its runs, or (a string) why it is skipped:
    (its DetectorParams with auto resolved, what was resolved and from what,
    (train_real, test_t, groups, runs))."""
    from defectforge.detector import prepare_items
    from defectforge.detector.resolution import data_sizes, resolve, resolved_fields

    tr = c[c["split"] == "train"]
    good = tr[tr["defect_type"] == "good"]
    if p.max_train_good is not None and len(good) > p.max_train_good:
        # one fixed subset (random_state 0) for every seed and run: the seeds vary the model, not the data
        tr = pd.concat([tr[tr["defect_type"] != "good"], good.sample(n=p.max_train_good, random_state=0)])
    te = c[c["split"] == "test"]
    test = _load_pairs(src_root, te)
    if not any(m.any() for _, m in test):
        return f"category {category!r} has no held-out real defect images to evaluate on"
    real_pairs = _load_pairs(src_root, tr)
    # auto resolution, patches, norm and score pool from this category's real training data
    sizes = data_sizes(real_pairs, list(tr["defect_type"]))
    pc = resolve(p, sizes)
    resolution = {**resolved_fields(pc), "short_side_px": sizes["short_side"], "defect_px": sizes["defect_px"],
                  "defect_px_by_type": sizes["defect_px_by_type"]}
    if progress:
        print(f"detector[{category}] resolution: " + ", ".join(f"{k} {v}" for k, v in resolved_fields(pc).items())
              + f" (images' short side {sizes['short_side']:.0f} px, smallest defects {sizes['defect_px'] or 0:.1f} px across)", flush=True)
    train_real = prepare_items(real_pairs, pc.size, f"{category} real training images", scale=pc.scale)
    test_t = prepare_items(test, pc.size, f"{category} test images", scale=pc.scale)
    types = list(te["defect_type"])
    groups = {"all": None, **{t: [i for i, d in enumerate(types) if d in (t, "good")] for t in sorted(set(types) - {"good"})}}
    synthetic = {}
    for method in sorted(syn["method"].unique()):
        s = syn[(syn["category"] == category) & (syn["method"] == method)]
        if len(s):
            synthetic[method] = prepare_items([(read_image(Path(r.abs_image)), read_mask(Path(r.abs_mask))) for r in s.itertuples()], pc.size, f"{category}/{method} synthetic samples", scale=pc.scale)
    return pc, resolution, (train_real, test_t, groups, _runs(p, train_real, synthetic))


def _runs(p: DetectorParams, train_real, synthetic: dict) -> dict:
    """(protocol, run) -> (real training items, synthetic items): mixed trains real-only and
    real + each method's samples; synthetic trains each method's samples + the real
    normals only (no real defect image)."""
    from defectforge.detector.compare import BASELINE

    runs = {}
    if p.protocol in ("mixed", "both"):
        runs[("mixed", BASELINE)] = (train_real, None)
        runs.update({("mixed", m): (train_real, s) for m, s in synthetic.items()})
    if p.protocol in ("synthetic", "both"):
        normals = _normals_only(train_real)
        runs.update({("synthetic", m): (normals, s) for m, s in synthetic.items()})
    return runs


def _train_jobs(p: DetectorParams, jobs: list, prepared: dict, resolved: dict, progress: bool) -> tuple[list[dict], list[dict]]:
    """Train and evaluate every (category, seed, protocol, run), one independent training each, on
    ``p.workers`` processes, in order; returns (the per-seed rows, the training curves' rows)."""
    rows, curves = [], []

    def job_args(job):
        category, seed, run = job
        train_real, test_t, groups, runs = prepared[category]
        # real_set_size: the steps budget is counted from the whole real training split in every protocol
        return resolved[category], *runs[run], test_t, groups, seed, len(train_real)

    for (category, seed, (protocol, run)), (evaluated, curve) in zip(jobs, spawn_map(_train_and_evaluate, map(job_args, jobs), p.workers, len(jobs))):
        train, extra = prepared[category][3][(protocol, run)]
        # no training time in the rows: details.json feeds the release, which must not
        # change with the machine's speed (docs/reproducibility.md); it goes to the log
        for dt, m in evaluated.items():
            rows.append({"category": category, "defect_type": dt, "run": run, "seed": seed, "protocol": protocol, "budget": p.budget,
                         **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in m.items()},
                         "train_real": len(train), "train_synthetic": 0 if extra is None else len(extra), "steps": curve[-1]["step"]})
            if dt == "all" and progress:
                print(f"detector[{category}/{run_label(protocol, run)}/seed {seed}, budget {p.budget}: {curve[-1]['step']} steps] loss {curve[-1]['loss']:.4f}; "
                      f"image AUROC {m['image_auroc']}, pixel AP {m['pixel_ap']}, AUPRO {m['aupro']}; {sum(r['seconds'] for r in curve):.1f} s", flush=True)
        curves += [{"category": category, "run": run_label(protocol, run), "seed": seed, "epoch": r["epoch"], "step": r["step"],
                    "loss": round(float(r["loss"]), 5), "lr": r["lr"]} for r in curve]
    return rows, curves


def _compare(p: DetectorParams, rows: list[dict], results: dict) -> tuple[list, dict, dict]:
    """(comparisons, learned by protocol, references) of the runs; every protocol asked for has an
    entry, and a skipped category is 'not learned' in each, with its reason."""
    from defectforge.detector.compare import compare_protocols

    comparisons, learned_by, references = compare_protocols(rows, p.budget)
    for protocol in ("mixed", "synthetic") if p.protocol == "both" else (p.protocol,):
        references.setdefault(protocol, None)  # a protocol with no run at all (no synthetic samples): no reference
        learned_by.setdefault(protocol, {})
    for category, r in results.items():
        if "skipped" in r:
            for protocol in learned_by:
                learned_by[protocol][category] = {"learned": False, "reason": r["skipped"], "image_auroc_real_only": None, "image_auroc_ci_low": None,
                                                  "n_seeds": 0, "protocol": protocol, "budget": p.budget}
    return comparisons, learned_by, references

CURVE_COLUMNS = ["category", "run", "seed", "epoch", "step", "loss", "lr"]
DELTA_COLUMNS = ["label", "category", "run", "delta", "ci_low", "ci_high", "verdict", "group", "n_seeds", "reference"]
HEADLINE_METRIC = "pixel_ap"  # the detector's headline in `dvc metrics show`: the defect-localisation score


def dvc_metrics(details: dict) -> dict:
    """metrics.json, the detector's line in ``dvc metrics show``: a few numbers that fit a terminal.

    ``metric`` names what the run columns hold (``Δ px AP``); ``learned``: categories whose reference detector
    learned / categories (the first protocol's sanity check, where it has a reference); one column per compared run (its label,
    :func:`run_label`): the mean over those categories of its paired Δ pixel AP against the reference
    (``not learned`` where no category learned). A protocol without a reference gives its runs' absolute pixel AP,
    averaged over categories. Every per-category number with its interval and verdict is in
    details.json, pixel AP's with its interval in delta_pixel_ap.csv (the plot)."""
    references = details.get("references") or {}
    learned = details.get("learned") or {}
    out: dict = {"metric": "Δ px AP" if any(r is not None for r in references.values()) else "px AP"}
    if learned:  # no reference, no sanity check
        out["learned"] = f"{sum(bool(v.get('learned')) for v in learned.values())}/{len(learned)}"
    by_run: dict[str, list[float]] = {}
    for c in details.get("comparisons") or []:
        if c.get("defect_type") != "all" or c.get("metric") != HEADLINE_METRIC:
            continue
        values = by_run.setdefault(run_label(c["protocol"], c["method"]), [])
        if c.get("verdict") != "detector did not learn" and isinstance(c.get("mean_diff"), (int, float)):
            values.append(c["mean_diff"])
    for r in details.get("absolute") or []:
        if references.get(r.get("protocol"), "") is None and r.get("defect_type") == "all" and r.get("metric") == HEADLINE_METRIC:
            by_run.setdefault(run_label(r["protocol"], r["run"]), []).append(r["mean"])
    # a run with no number (no category learned) says so: DVC leaves a null out of the table altogether
    out.update({run: (round(float(np.mean(v)), 3) if v else "not learned") for run, v in sorted(by_run.items())})
    return out


def deltas_table(details: dict) -> pd.DataFrame:
    """delta_pixel_ap.csv: per category and compared run (``label`` = ``<category>/<run>``, one point in
    the plot) the paired mean difference in pixel AP on the whole test set against the reference,
    with its 95 % interval and verdict (``group``: the verdict, the plot's colour; ``reference``: 0, no
    difference, the plot's vertical line)."""
    rows = [{"label": f"{c['category']}/{run_label(c['protocol'], c['method'])}", "category": c["category"],
             "run": run_label(c["protocol"], c["method"]), "delta": c.get("mean_diff"), "ci_low": c.get("ci_low"),
             "ci_high": c.get("ci_high"), "verdict": c.get("verdict"), "group": c.get("verdict"), "n_seeds": c.get("n_seeds"),
             "reference": 0.0}
            for c in details.get("comparisons") or [] if c.get("defect_type") == "all" and c.get("metric") == HEADLINE_METRIC]
    return pd.DataFrame(rows, columns=DELTA_COLUMNS)


def write_dvc_files(details: dict, curves: list[dict], out_dir: str | os.PathLike) -> None:
    """What DVC shows of the stage: metrics.json (:func:`dvc_metrics`, `dvc metrics show`), curves.csv
    (every training run's loss per epoch: one line per category, run and seed in `dvc plots show`) and
    delta_pixel_ap.csv (:func:`deltas_table`: Δ pixel AP per category and run with its interval)."""
    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "metrics.json", dvc_metrics(details))
    pd.DataFrame(curves, columns=CURVE_COLUMNS).to_csv(out_dir / "curves.csv", index=False)
    deltas_table(details).to_csv(out_dir / "delta_pixel_ap.csv", index=False)


def run_label(protocol: str, run: str) -> str:
    """The name of a run in per_category, metrics.json and curves.csv: the run itself in the
    mixed protocol (``real-only``, ``copy-paste``), ``synthetic/<method>`` in the synthetic one."""
    return run if protocol == "mixed" else f"{protocol}/{run}"


def _normals_only(items):
    """The defect-free items of a :class:`~defectforge.detector.train.Prepared` set (the
    synthetic protocol's real training images: AnomalyDiffusion trains on generated pairs +
    normal images)."""
    from defectforge.detector import Prepared

    keep = [i for i, d in enumerate(items.defect_pixels) if not len(d)]
    if not keep:
        raise DefectforgeError("detector.protocol synthetic: the real training split has no defect-free image to train with")
    return Prepared([items.xs[i] for i in keep], [items.ys[i] for i in keep], items.size, items.scale, [items.defect_pixels[i] for i in keep])


def _train_and_evaluate(p: DetectorParams, train_real, extra, test_t, groups, seed: int, real_set_size: int | None = None):
    """One paired run: the detector trained on ``train_real`` (+ ``extra``) with ``seed`` and the
    budget rule ``p.budget``, evaluated on every test group; (metrics per group, training curve)."""
    from defectforge.detector import evaluate_groups, train_detector

    model, curve = train_detector(
        train_real, synthetic_items=extra, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr, seed=seed, size=p.size,
        scale=p.scale, patch=p.patch, base_channels=p.base_channels, depth=p.depth, norm=p.norm, score_pool=p.score_pool,
        budget=p.budget, real_set_size=real_set_size,
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
    from defectforge.manifest.validate import require_kind

    for man, q in zip(manifests, qcs):
        root = Path(require_kind(man, "synthetic", "detector --refined")["dataset_root"])
        df = read_manifest(man).to_pandas()
        if q is not None:
            read_parquet_schema(q)  # a junk or torn file: one line naming it
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
                 "n_images": rows[0].get("n_images"), "n_defect_images": rows[0].get("n_defect_images"),
                 **{k: rows[0][k] for k in ("protocol", "budget", "steps") if k in rows[0]}}
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

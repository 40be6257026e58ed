"""One function per DAG stage: what ``stages/*.py``, the CLI and the Prefect flow call.

Each function takes validated params sections and explicit paths (paths come from
dvc.yaml's command line, never hard-coded twice), writes its outputs atomically and
validates every manifest it writes with the Great Expectations suite.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from defectforge.errors import DataError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.validate import check_manifest
from defectforge.params import DataParams, GenerateParams, ReleaseParams, SampleParams, SplitParams


def run_sample(p: SampleParams, out_dir: str | os.PathLike) -> Path:
    """Make the built-in sample dataset (MVTec AD layout) in ``out_dir``."""
    from defectforge.data.sample import make_sample

    return make_sample(out_dir, seed=p.seed, size=p.size, n_train_good=p.n_train_good, n_test_good=p.n_test_good, n_defect=p.n_defect)


def run_ingest(p: DataParams, out: str | os.PathLike, *, root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Read a dataset folder into the source manifest ``out`` (validated)."""
    from defectforge.data.adapters import ingest

    root = Path(root if root is not None else p.root)
    df = ingest(p.layout, root, image_glob=p.image_glob, mask_rule=p.mask_rule, mask_threshold=p.mask_threshold, progress=progress)
    if p.categories:
        df = df[df["category"].isin(p.categories)]
    if p.defect_types:
        df = df[df["defect_type"].isin(list(p.defect_types) + ["good"])]
    if df.empty:
        raise DataError(f"{root}: no images left after data.categories / data.defect_types filters")
    return _write_checked(df, out, kind="source", dataset_root=root)


def run_split(p: SplitParams, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Assign train/test (and folds) to the source rows; writes the split manifest."""
    from defectforge.data.split import split_sources

    info = manifest_info(source)
    df = read_manifest(source).to_pandas()
    out_df = split_sources(df, scheme=p.scheme, k=p.k, fold=p.fold, seed=p.seed, good_test_fraction=p.good_test_fraction)
    return _write_checked(out_df, out, kind="split", dataset_root=info["dataset_root"])


def build_method(p: GenerateParams, name: str):
    """The configured method object for ``name`` (its config from the method's params section)."""
    from defectforge.methods.base import get_method_class

    cls = get_method_class(name)
    section = getattr(p, name.replace("-", "_"), None)
    kwargs = section.model_dump() if section is not None else {}
    if name == "copy-paste":
        return cls(cls.config_class(**kwargs))
    return cls.from_pretrained({}, cls.config_class(**kwargs))


def run_generate(
    p: GenerateParams, split: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoints: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Generate synthetic samples with every method of ``generate.methods`` into ``out_dir/<method>/``.

    One dataset root (``out_dir``) holds all methods; returns it after the manifest suite
    passed. With ``generate.workers > 1`` or a ``generate.scheduler`` address the shards
    fan out on Dask (:mod:`defectforge.fanout`); the stage stays one DVC stage, so there is
    one ``dvc repro`` and one workspace lock however many machines do the work.
    """
    out_root = Path(out_dir)
    if out_root.is_dir():  # persist: drop the output of methods no longer asked for
        for child in out_root.iterdir():
            if child.is_dir() and child.name not in p.methods:
                shutil.rmtree(child)
    for name in p.methods:
        if p.workers > 1 or p.scheduler:
            from defectforge.fanout import generate_on_dask

            generate_on_dask(p, name, split, out_root, checkpoints=checkpoints, progress=progress)
        else:
            generate_method(p, name, split, out_root, checkpoints=checkpoints, progress=progress)
    check_manifest(out_root)
    return out_root


def generate_method(
    p: GenerateParams, name: str, split, out_root, *, checkpoints: str | os.PathLike | None = None, progress: bool = True, shards: list[int] | None = None
) -> Path:
    """One method's samples (or some of its shards) into ``out_root/<name>/``.

    Diffusion methods load the fine-tuned checkpoint of each (category, defect type)
    from ``checkpoints`` (the finetune stage's folder).
    """
    from defectforge.generate import run_generation

    method = build_method(p, name)
    fit = None if name == "copy-paste" else _checkpoint_loader(name, checkpoints)
    options = {}
    if name == "copy-paste":
        options = {"max_rotation": p.copy_paste.max_rotation, "scale_range": tuple(p.copy_paste.scale_range), "flip": p.copy_paste.flip}
    return run_generation(
        split,
        Path(out_root) / name,
        dataset_root=out_root,
        method=method,
        n_per_defect=p.n_per_defect,
        seed=p.seed,
        shard_size=p.shard_size,
        params_sha256=p.method_sha256(name),
        target_mask_options=options,
        fit=fit,
        shards=shards,
        progress=progress,
    )


def _checkpoint_loader(name: str, checkpoints: str | os.PathLike | None):
    """The ``fit`` hook of a diffusion method: load its category's fine-tuned checkpoints."""
    if checkpoints is None:
        raise DataError(f"generate: method {name!r} needs the finetune stage's checkpoints")
    from defectforge.diffusion.sampling import ModelCache
    from defectforge.modeling import checkpoints as category_checkpoints

    caches: dict = {}

    def load(method, category, defect, reals):  # noqa: ARG001 - the checkpoint already learned the reals
        if category not in caches:
            caches[category] = ModelCache(category_checkpoints(checkpoints, category), method.config.device)
        method.models = caches[category]

    return load


def content_version(manifest_dir: str | os.PathLike) -> str:
    """A content address for a synthetic dataset: the hash of its sorted ids and file hashes."""
    df = read_manifest(manifest_dir, columns=["sample_id", "image_sha256", "mask_sha256"]).to_pandas().sort_values("sample_id")
    blob = "\n".join(f"{r.sample_id} {r.image_sha256} {r.mask_sha256}" for r in df.itertuples())
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_release(
    p: ReleaseParams,
    refined: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quality: str | os.PathLike | None = None,
    detector: str | os.PathLike | None = None,
    split: str | os.PathLike | None = None,
) -> Path:
    """Write the versioned manifest (with per-sample QC), metrics, the HTML report and the card.

    The version is content-addressed (``<name>@<hash of ids and file hashes>``): the same
    samples always give the same version string. ``quality`` and ``detector`` are the
    folders of those stages (optional, so a copy-paste-only DAG can release too).
    """
    refined = Path(refined)
    dataset_root = Path(manifest_info(refined)["dataset_root"])
    version = f"{p.name}@{content_version(refined)}"
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    df = read_manifest(refined).to_pandas()
    metrics: dict = {}
    if quality is not None:
        import pandas as pd

        from defectforge.manifest.schema import QC_COLUMNS

        qc = pd.read_parquet(Path(quality) / "qc.parquet")
        df = df.drop(columns=[c for c in QC_COLUMNS if c in df.columns]).merge(qc, on="sample_id", how="left")
        metrics["quality"] = json.loads((Path(quality) / "details.json").read_text())
    if detector is not None:
        metrics["detector"] = json.loads((Path(detector) / "details.json").read_text())
    df["dataset_version"] = version
    manifest = write_manifest(df, tmp / "manifest.parquet", kind="synthetic", dataset_root=dataset_root, dataset_version=version)
    check_manifest(manifest)
    counts = df.groupby(["category", "defect_type", "method"]).size().reset_index(name="samples")
    headline = headline_metrics(metrics)
    summary = {"dataset_version": version, "samples": int(len(df)), "counts": counts.to_dict(orient="records"), "metrics": headline}
    (tmp / "release.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    report = None
    if split is not None:
        from defectforge.reporting import build_report

        report = build_report(tmp / "report.html", title=f"defectforge dataset {version}", manifest=manifest, split=split, metrics=metrics, detector_dir=detector)
    (tmp / "README.md").write_text(_card(version, df, counts, headline, report is not None, details=metrics))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir / "manifest.parquet"


def headline_metrics(metrics: dict) -> dict:
    """A flat dict of the numbers a data team looks at first (for cards and list-versions).

    Besides the mean metrics per run: ``detector.<category>.learned`` and, per comparison over
    all defect types, ``detector.<category>.<method>.<metric>`` = the verdict in words with
    the mean difference and its 95 % interval; ``realism.<method>.<score>`` per method.
    """
    from defectforge.report import signed, realism_by_method

    out: dict = {}
    q = metrics.get("quality")
    if q:
        out["qc_pass_rate"] = q.get("pass_rate")
        for method, r in realism_by_method(list((q.get("sets") or {}).values())).items():
            for k in ("saturation", "c2st_accuracy", "intensity_distance"):
                if r.get(k) is not None:
                    out[f"realism.{method}.{k}"] = round(r[k], 4)
    det = metrics.get("detector") or {}
    d = det.get("mean") or {}
    for run, m in d.items():
        if not isinstance(m, dict):
            continue
        for k in ("image_auroc", "pixel_ap", "aupro"):
            if isinstance(m.get(k), (int, float)):
                out[f"{run}.{k}"] = m[k]
    for category, info in (det.get("learned") or {}).items():
        if isinstance(info, dict) and "learned" in info:
            out[f"detector.{category}.learned"] = bool(info["learned"])
    for r in det.get("comparisons") or []:
        if r.get("defect_type") not in (None, "", "all"):
            continue
        verdict = r.get("verdict")
        if verdict != "detector did not learn":
            verdict = f"{verdict} (Δ {signed(r.get('mean_diff'))}, 95 % CI [{signed(r.get('ci_low'))}, {signed(r.get('ci_high'))}])"
        out[f"detector.{r.get('category')}.{r.get('method')}.{r.get('metric')}"] = verdict
    return out


def _measured(details: dict) -> list[str]:
    """The card's "Measured" part: detector verdicts in words, realism per method, backbones."""
    from defectforge.report import (NOT_LEARNED, describe_comparison, detector_findings, not_learned_sentence,
                                    realism_by_method, realism_sentence)

    lines: list[str] = []
    det = details.get("detector") or {}
    q = details.get("quality") or {}
    sets = list((q.get("sets") or {}).values())
    if det:
        lines += ["", "**Detector** (U-Net trained from scratch on real + synthetic images against real-only, "
                  "scored on held-out real test images):", ""]
        learned = det.get("learned") or {}
        comparisons = det.get("comparisons")
        if comparisons is None:
            lines.append("- One seed per condition, no confidence intervals: the detector numbers in `metrics.json` "
                         "are within seed-to-seed noise and are **not a ranking** of the methods.")
        else:
            rows = [r for r in comparisons if r.get("defect_type") in (None, "", "all")] or list(comparisons)
            for category in sorted({str(r.get("category")) for r in rows} | set(learned)):
                info = learned.get(category) or {}
                mine = [r for r in rows if str(r.get("category")) == category]
                if info.get("learned") is False or any(r.get("verdict") == NOT_LEARNED for r in mine):
                    lines.append(f"- {category}: {not_learned_sentence(category, info)}")
                    continue
                lines.append(f"- {category}:")
                lines += [f"  - {describe_comparison(r)}" for r in mine]
            hurts = [t for k, t in detector_findings(det) if k == "hurts"]
            if hurts:
                lines += ["", "**Synthetic data hurts the detector** in: " + "; ".join(hurts) + "."]
    realism = realism_by_method(sets)
    if realism:
        lines += ["", "**Realism** (per method; saturated share of in-mask pixels, classifier two-sample test "
                  "accuracy where 0.5 = indistinguishable from real defects, intensity-profile distance, "
                  "in-mask contrast against the real interquartile range):", ""]
        lines += [f"- {realism_sentence(m, r)}" for m, r in realism.items()]
    names = sorted({str(r[k]) for r in sets for k in ("backbone", "lpips_backbone") if r.get(k)})
    c2st = sorted({str(r["c2st_classifier"]) for r in sets if r.get("c2st_classifier")})
    if names or c2st or det:
        lines += ["", "**Backbones:** " + "; ".join(
            ([f"FID/KID/LPIPS: {', '.join(f'`{n}`' for n in names)}"] if names else [])
            + ([f"C2ST classifier: {', '.join(f'`{n}`' for n in c2st)}"] if c2st else [])
            + ([_detector_name(det)] if det else []))]
        if any(n.startswith("random-") for n in names):
            lines.append("`random-…` backbones are seeded, randomly initialised networks (no pretrained weights offline): "
                         "their numbers compare methods on this data only, not with published results.")
    return ["", "## Measured", *lines] if lines else []


def _detector_name(det: dict) -> str:
    b = det.get("budget") or {}
    facts = [f"{k} {b[k]}" for k in ("size", "epochs", "base_channels", "depth") if k in b]
    seeds = b.get("seeds")
    if isinstance(seeds, (list, tuple)):
        facts.append(f"{len(seeds)} seeds")
    elif isinstance(seeds, int):
        facts.append(f"{seeds} seeds")
    return "detector: U-Net from scratch" + (f" ({', '.join(facts)})" if facts else "")


def _card(version: str, df, counts, metrics, has_report: bool = False, *, details: dict | None = None) -> str:
    lines = [
        f"# defectforge dataset `{version}`",
        "",
        "Synthetic industrial defect images with pixel masks, made by defectforge.",
        "",
        f"- samples: {len(df)}",
        f"- methods: {', '.join(sorted(df['method'].unique()))}",
        "- manifest: `manifest.parquet` (one row per sample; paths relative to the dataset root",
        "  stored in the file's metadata; read it with `defectforge.manifest.io.read_manifest`)",
        "",
        "| category | defect type | method | samples |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r.category} | {r.defect_type} | {r.method} | {r.samples} |" for r in counts.itertuples()]
    if "qc_pass" in df and df["qc_pass"].notna().any():
        lines += ["", f"Per-sample quality gates: {int(df['qc_pass'].fillna(False).sum())} of {len(df)} samples pass "
                  "(failing rows are kept, flagged in `qc_pass` / `qc_reasons`)."]
    if details:
        lines += _measured(details)
    if metrics:
        lines += ["", "## Headline metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
        lines += ["", "Full numbers, with the backbone beside every image-quality figure: `metrics.json`."]
    if has_report:
        lines += ["", "Report (sample grids, detector verdicts, realism, quality and detector tables, training curves): "
                  "[report.html](report.html)"]
    return "\n".join(lines) + "\n"


def _write_checked(df, out, *, kind: str, dataset_root) -> Path:
    """Write ``df`` to a temporary manifest, validate it, then move it to ``out``."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.unchecked")
    write_manifest(df, tmp, kind=kind, dataset_root=dataset_root)
    try:
        check_manifest(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out

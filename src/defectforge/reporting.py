"""Builds the release's HTML report from the stage outputs (rendering: :mod:`defectforge.report`)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from defectforge.data.io import read_image, read_mask
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.report import SampleGrid, write_report


def build_report(
    path: str | os.PathLike,
    *,
    title: str,
    manifest: str | os.PathLike,
    split: str | os.PathLike,
    metrics: dict,
    detector_dir: str | os.PathLike | None = None,
    per_row: int = 6,
) -> Path:
    """One self-contained HTML file: grids of held-out real vs synthetic samples per defect
    type (mask overlays), the quality table (backbones named), the detector table (real-only
    highlighted) and the detector's training curves."""
    root = Path(manifest_info(manifest)["dataset_root"])
    src_root = Path(manifest_info(split)["dataset_root"])
    syn = read_manifest(manifest).to_pandas().sort_values("sample_id")
    real = read_manifest(split).to_pandas()
    real = real[(real["split"] == "test") & (real["defect_type"] != "good")]
    grids = []
    for (category, defect), group in syn.groupby(["category", "defect_type"], sort=True):
        rr = real[(real["category"] == category) & (real["defect_type"] == defect)].head(per_row)
        grids.append(
            SampleGrid(
                defect_type=f"{category} / {defect}",
                real=[(read_image(src_root / r.image_path), read_mask(src_root / r.mask_path)) for r in rr.itertuples()],
                synthetic={
                    method: [(read_image(root / r.image_path), read_mask(root / r.mask_path)) for r in g.head(per_row).itertuples()]
                    for method, g in group.groupby("method", sort=True)
                },
            )
        )
    quality_rows = [dict(r, defect_type=f"{r['category']}/{r['defect_type']}") for r in (metrics.get("quality") or {}).get("sets", {}).values()]
    detector_rows, curves = [], {}
    det = metrics.get("detector") or {}
    for category, runs in det.get("per_category", {}).items():
        for run, m in runs.items():
            if isinstance(m, dict):
                detector_rows.append({"defect_type": category, "run": run, "n_train": m.get("train_real"), "n_synthetic": m.get("train_synthetic"), **m})
    if detector_dir is not None and (Path(detector_dir) / "curves.csv").is_file():
        c = pd.read_csv(Path(detector_dir) / "curves.csv")
        for (category, run), g in c.groupby(["category", "run"], sort=True):
            curves[f"{category}/{run}"] = g[["epoch", "loss"]].to_dict(orient="records")
    meta = {"samples": len(syn), "methods": ", ".join(sorted(syn["method"].unique()))}
    if "qc_pass" in syn:
        meta["qc_pass"] = f"{int(syn['qc_pass'].fillna(False).sum())} / {len(syn)}"
    return write_report(path, title=title, grids=grids, quality_rows=quality_rows, detector_rows=detector_rows, curves=curves, meta=meta)

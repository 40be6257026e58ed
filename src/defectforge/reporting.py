"""Builds the release's HTML report from the stage outputs (rendering: :mod:`defectforge.report`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, get_args

import pandas as pd

from defectforge.data.io import read_image, read_mask
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.report import Sample, SampleGrid, write_report


def method_order(present: Sequence[str], methods: Sequence[str] | None = None) -> list[str]:
    """The grid's method columns: ``copy-paste`` first, then ``methods`` (``generate.methods``;
    default: the registry's order), then any other method present, sorted."""
    from defectforge.params import MethodName

    order = list(methods) if methods is not None else list(get_args(MethodName))
    known = [m for m in order if m in present]
    rest = sorted(m for m in present if m not in known)
    out = known + rest
    return [m for m in out if m == "copy-paste"] + [m for m in out if m != "copy-paste"]


def _reasons(value) -> tuple[str, ...]:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ()
    return tuple(str(v) for v in value)


def _qc(value) -> bool | None:
    return None if value is None or pd.isna(value) else bool(value)


def sample_grids(manifest, split, *, per_cell: int = 4, methods: Sequence[str] | None = None) -> list[SampleGrid]:
    """One :class:`SampleGrid` per (category, defect type) of the synthetic manifest.

    ``real``: the split's real defects of the type, held-out test images first, then
    training ones. Each method's samples keep their quality-gate result; the ones that
    failed come first and at most ``per_cell`` are read per column.
    """
    root = Path(manifest_info(manifest)["dataset_root"])
    src_root = Path(manifest_info(split)["dataset_root"])
    syn = read_manifest(manifest).to_pandas().sort_values("sample_id")
    real = read_manifest(split).to_pandas()
    real = real[(real["defect_type"] != "good") & real["mask_path"].notna()]
    real = real.assign(_order=(real["split"] != "test").astype(int)).sort_values(["_order", "image_id"], kind="stable")
    if "qc_pass" not in syn:
        syn = syn.assign(qc_pass=None)
    if "qc_reasons" not in syn:
        syn = syn.assign(qc_reasons=None)
    grids = []
    for (category, defect), group in syn.groupby(["category", "defect_type"], sort=True):
        rr = real[(real["category"] == category) & (real["defect_type"] == defect)].head(per_cell)
        synthetic = {}
        for method in method_order(list(group["method"].unique()), methods):
            g = group[group["method"] == method]
            g = g.assign(_fail=g["qc_pass"].map(lambda v: 0 if _qc(v) is False else 1)).sort_values(["_fail", "sample_id"], kind="stable")
            synthetic[method] = [
                Sample(read_image(root / r.image_path), read_mask(root / r.mask_path), _qc(r.qc_pass), _reasons(r.qc_reasons), r.sample_id[:12])
                for r in g.head(per_cell).itertuples()
            ]
        grids.append(
            SampleGrid(
                defect_type=f"{category} / {defect}",
                real=[Sample(read_image(src_root / r.image_path), read_mask(src_root / r.mask_path), label=f"{r.split} {Path(r.image_path).stem}") for r in rr.itertuples()],
                synthetic=synthetic,
            )
        )
    return grids


def build_report(
    path: str | os.PathLike,
    *,
    title: str,
    manifest: str | os.PathLike,
    split: str | os.PathLike,
    metrics: dict,
    detector_dir: str | os.PathLike | None = None,
    per_cell: int = 4,
    methods: Sequence[str] | None = None,
) -> Path:
    """One self-contained HTML file: the sample grid per (category, defect type) at the top
    (real | copy-paste | other methods; plain image, mask, overlay; failures first), the
    detector's verdicts, the realism scores, the quality table (backbones named), the raw
    detector table and the detector's training curves."""
    syn = read_manifest(manifest).to_pandas()
    grids = sample_grids(manifest, split, per_cell=per_cell, methods=methods)
    quality_rows = [dict(r, defect_type=f"{r['category']}/{r['defect_type']}") for r in (metrics.get("quality") or {}).get("sets", {}).values()]
    detector_rows, curves = [], {}
    det = metrics.get("detector") or {}
    for category, runs in (det.get("per_category") or {}).items():
        for run, m in runs.items():
            if isinstance(m, dict):
                detector_rows.append({"defect_type": category, "run": run, "n_train": m.get("train_real"), "n_synthetic": m.get("train_synthetic"),
                                      **{k: v for k, v in m.items() if not isinstance(v, (dict, list))}})
    if detector_dir is not None and (Path(detector_dir) / "curves.csv").is_file():
        c = pd.read_csv(Path(detector_dir) / "curves.csv")
        for (category, run), g in c.groupby(["category", "run"], sort=True):  # several seeds: their mean loss per epoch
            curves[f"{category}/{run}"] = g.groupby("epoch", as_index=False)["loss"].mean().to_dict(orient="records")
    meta = {"samples": len(syn), "methods": ", ".join(method_order(list(syn["method"].unique()), methods))}
    if "qc_pass" in syn:
        meta["qc_pass"] = f"{int(syn['qc_pass'].fillna(False).sum())} / {len(syn)}"
    return write_report(path, title=title, grids=grids, quality_rows=quality_rows, detector_rows=detector_rows, detector=det or None,
                        curves=curves, meta=meta, max_per_cell=per_cell)


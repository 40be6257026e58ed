"""Stage ``release``: the versioned manifest with per-sample QC, metrics, report and card.

The version is content-addressed (``<name>@<hash of ids and file hashes>``): the same
samples always give the same version string. Publishing a release as a numbered
version (git tag + ``dvc push``) is :mod:`defectforge.publish.versions`.

Before anything is written, every row's ``image_sha256`` / ``mask_sha256`` is checked
against its file (:func:`~defectforge.manifest.validate.require_hashes`, files hashed in parallel threads; ``verify=False``,
``--no-verify`` on the command line, skips it): a file changed after generation is never published under the old hash.
A generate output with a planned shard missing or uncommitted (a run that failed or was killed
part-way) is refused first, whatever ``verify`` says (:func:`~defectforge.manifest.validate.check_complete`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pandas as pd

from defectforge.data.files import atomic_dir, claim_dir
from defectforge.errors import DataError, ManifestError, writing
from defectforge.manifest.io import manifest_info, read_manifest, read_parquet_schema, write_manifest
from defectforge.manifest.schema import QC_COLUMNS
from defectforge.manifest.validate import check_complete, check_manifest, require_hashes, require_kind, untemp
from defectforge.params.release import ReleaseParams
from defectforge.publish.card import card, headline_metrics, provenance
from defectforge.publish.report import build_report


def content_version(manifest_dir: str | os.PathLike) -> str:
    """A content address for a synthetic dataset: the hash of its sorted ids and file hashes."""
    df = read_manifest(manifest_dir, columns=["sample_id", "image_sha256", "mask_sha256"]).to_pandas().sort_values("sample_id")
    blob = "\n".join(f"{r.sample_id} {r.image_sha256} {r.mask_sha256}" for r in df.itertuples())
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run(
    p: ReleaseParams,
    refined: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    quality: str | os.PathLike | None = None,
    detector: str | os.PathLike | None = None,
    split: str | os.PathLike | None = None,
    verify: bool = True,
) -> Path:
    """Write the versioned manifest (with per-sample QC), metrics, the HTML report and the card.

    The version is content-addressed (``<name>@<hash of ids and file hashes>``): the same
    samples always give the same version string. ``quality`` and ``detector`` are the
    folders of those stages (optional, so a copy-paste-only DAG can release too).
    ``verify``: check every row's image and mask hash against its file first.

    ``out_dir`` is replaced only when it is missing, empty or made by defectforge; the
    new folder is built beside it and swapped in, and a failure leaves neither a
    half-written release nor a temporary folder behind.
    """
    _check_swappable(out_dir)
    claim_dir(out_dir, "release folder")  # refuse a user's folder before any work
    refined = Path(refined)
    dataset_root = Path(require_kind(refined, "synthetic", "release --refined")["dataset_root"])
    if split is not None:
        require_kind(split, "split", "release --split")
    check_complete(refined)  # a half-made generate output is never released as a whole
    if verify:
        require_hashes(read_manifest(refined).to_pandas(), dataset_root, source=str(refined))
    version = f"{p.name}@{content_version(refined)}"
    if p.name == DEFAULT_NAME and split is not None and not is_builtin_sample(manifest_info(split)["dataset_root"]):
        print(f"release: named {version} after the built-in sample (release.name's default); name your dataset with "
              "`dvc exp run -S release.name=<name>` or release.name in params.yaml", file=sys.stderr)
    with writing(out_dir, "release folder", "free space (or give an --out on another device) and rerun; the previous "
                 "release, if any, is untouched"), atomic_dir(out_dir, "release folder") as tmp:
        try:
            _write_release(p, refined, tmp, version, dataset_root, quality, detector, split)
        except ManifestError as exc:  # checked while still in the temporary folder: name the release's own path
            raise ManifestError(untemp(str(exc), tmp, Path(out_dir))) from None
    return Path(out_dir) / "manifest.parquet"


DEFAULT_NAME = ReleaseParams.model_fields["name"].default


def is_builtin_sample(dataset_root: str | os.PathLike) -> bool:
    """Whether a dataset root is the built-in sample's (the sample stage writes ``sample.json`` there)."""
    return (Path(dataset_root) / "sample.json").is_file()


def _check_swappable(out_dir: str | os.PathLike) -> None:
    """The release folder is built beside ``out_dir`` and renamed into its place: ``.``, ``..``,
    ``/`` or any folder holding the current directory cannot be renamed that way (and must not be
    replaced). Refused in one line, before a temporary folder is made beside it."""
    out = Path(out_dir)
    real = Path(os.path.realpath(out))
    cwd = Path(os.path.realpath(os.getcwd()))
    if out.name in ("", ".", "..") or real == cwd or real in cwd.parents or real == real.parent:
        raise DataError(f"{out_dir}: the release folder is replaced as a whole, so it cannot be the current folder or one "
                        "holding it; give a folder of its own, e.g. --out data/release")


def _write_release(p: ReleaseParams, refined: Path, tmp: Path, version: str, dataset_root: Path, quality, detector, split) -> None:
    df = read_manifest(refined).to_pandas()
    metrics: dict = {}
    if quality is not None:
        read_parquet_schema(Path(quality) / "qc.parquet")  # a junk or torn file: one line naming it
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
    gates = None
    if quality is not None and (Path(quality) / "gates.json").is_file():
        gates = json.loads((Path(quality) / "gates.json").read_text())
    prov = provenance(df, source_root=manifest_info(split)["dataset_root"] if split is not None else None,
                      project=refined.resolve().parent, quarantine_dir=Path(split).parent if split is not None else None)
    summary = {"dataset_version": version, "samples": int(len(df)), "counts": counts.to_dict(orient="records"), "metrics": headline,
               "provenance": {**{k: v for k, v in prov.items() if k not in ("methods", "quarantine")},
                              "methods": sorted(prov["methods"]), "quarantined": len(prov["quarantine"])}}
    (tmp / "release.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    report = None
    if split is not None:
        report = build_report(tmp / "report.html", title=f"defectforge dataset {version}", manifest=manifest, split=split, metrics=metrics, detector_dir=detector)
    (tmp / "README.md").write_text(card(version, df, counts, headline, report is not None, details=metrics, prov=prov, gates=gates))

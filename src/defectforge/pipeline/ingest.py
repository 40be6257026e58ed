"""Stage ``ingest``: a dataset folder into the validated source manifest.

Besides the manifest ``<out>`` it writes the *quarantine file* ``<out stem>.quarantine.json``
beside it (``data/manifests/source.quarantine.json`` in the DVC pipeline): the samples
left out because they are bad (``data.on_bad: skip``), or, with ``data.on_bad: fail``,
the full list of bad samples that stopped the run (the manifest is then not written).
Format (JSON, sorted keys, byte-stable)::

    {"format": "defectforge-quarantine/1", "made_by": "defectforge ingest",
     "dataset_root": "../sample", "layout": "mvtec", "on_bad": "skip",
     "manifest": "source.parquet", "manifest_written": true,
     "checked": 733, "kept": 729, "quarantined": 4, "bad": 4,
     "by_reason": {"empty mask": 4},
     "samples": [{"image_id": "...", "category": "...", "defect_type": "...",
                  "image_path": "<relative to dataset_root>", "mask_path": "..." | null,
                  "reason": "empty mask", "detail": "<one line naming the file>"}, ...]}

``dataset_root`` is relative to the quarantine file's folder (as in the manifest's
metadata), ``checked`` counts the samples after ``data.categories`` / ``data.defect_types``,
``quarantined`` is 0 when the manifest was not written (``bad`` counts them anyway).
``reason`` is one of :data:`defectforge.data.adapters.REASONS`. An existing ``<out>`` or
quarantine file is only replaced when defectforge wrote it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from defectforge.errors import DataError
from defectforge.manifest.validate import write_checked
from defectforge.params.data import DataParams

QUARANTINE_FORMAT = "defectforge-quarantine/1"


def quarantine_path(out: str | os.PathLike) -> Path:
    """The quarantine file beside the source manifest ``out``."""
    out = Path(out)
    return out.with_name(f"{out.stem}.quarantine.json")


def run(p: DataParams, out: str | os.PathLike, *, root: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Read ``root`` (default ``data.root``) with ``data.layout`` into the source manifest ``out``."""
    from defectforge.data.adapters import BadSamplesError, ingest, summarize

    out = Path(out)
    quarantine = quarantine_path(out)
    _check_ours(out, _is_our_manifest, "a defectforge manifest")
    _check_ours(quarantine, _is_our_quarantine, "a defectforge quarantine file")
    root = Path(root if root is not None else p.root)
    # every file is checked in one pass; the policy is applied here, after the category filters
    df = ingest(p.layout, root, image_glob=p.image_glob, mask_rule=p.mask_rule, mask_threshold=p.mask_threshold,
                on_bad="skip", progress=progress)
    bad = df.attrs.get("bad", [])
    if p.categories:
        df = df[df["category"].isin(p.categories)]
        bad = [b for b in bad if b.category in p.categories]
    if p.defect_types:
        keep = list(p.defect_types) + ["good"]
        df = df[df["defect_type"].isin(keep)]
        bad = [b for b in bad if b.defect_type in keep]
    checked = len(df) + len(bad)
    if bad and p.on_bad == "fail":
        _write_quarantine(quarantine, p, root, out, bad, checked=checked, kept=0, written=False)
        raise BadSamplesError(
            f"{root}: {len(bad)} of {checked} samples are bad ({summarize(bad)}); nothing written; "
            f"the full list is in {quarantine} (data.on_bad: skip leaves them out); first: {bad[0].detail}", bad)
    if df.empty:
        raise DataError(f"{root}: no images left after data.categories / data.defect_types filters")
    written = write_checked(df, out, kind="source", dataset_root=root)
    _write_quarantine(quarantine, p, root, out, bad, checked=checked, kept=len(df), written=True)
    return written


def _check_ours(path: Path, ours, what: str) -> None:
    """``path`` may be missing or a regular file defectforge wrote; anything else is refused."""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise DataError(f"{path}: exists and is not a regular file (a folder, link or device); give a new file path")
    if path.is_file() and not ours(path):
        raise DataError(f"{path}: exists and is not {what}; refusing to overwrite a file defectforge did not write")


def _is_our_manifest(path: Path) -> bool:
    try:
        from defectforge.manifest.io import manifest_info

        manifest_info(path)
        return True
    except Exception:  # noqa: BLE001 - not Parquet, or no defectforge metadata
        return False


def _is_our_quarantine(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == QUARANTINE_FORMAT
    except Exception:  # noqa: BLE001 - not JSON, not ours
        return False


def _write_quarantine(path: Path, p: DataParams, root: Path, out: Path, bad, *, checked, kept: int, written: bool) -> None:
    from collections import Counter

    from defectforge.data.files import atomic_write_json

    atomic_write_json(path, {
        "format": QUARANTINE_FORMAT,
        "made_by": "defectforge ingest",
        "dataset_root": Path(os.path.relpath(root.resolve(), path.parent.resolve())).as_posix(),
        "layout": p.layout,
        "on_bad": p.on_bad,
        "manifest": out.name,
        "manifest_written": written,
        "checked": checked,
        "kept": kept,
        "quarantined": len(bad) if written else 0,
        "bad": len(bad),
        "by_reason": dict(Counter(b.reason for b in bad)),
        "samples": [b.to_dict() for b in bad],
    })

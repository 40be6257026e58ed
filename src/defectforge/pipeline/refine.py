"""Stage ``refine``: the mask that goes into the dataset.

Eq. 13 of the DDIM-inversion paper from the defect tokens' cross-attention where a
method saved one, the raw target mask otherwise (the raw mask stays in the manifest
beside it). Every row records where its mask came from in ``mask_source``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from defectforge.data.codec import encode_png, read_image, read_mask
from defectforge.data.files import atomic_dir, atomic_write_bytes, sha256_bytes
from defectforge.errors import DataError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.validate import check_manifest, require_kind
from defectforge.masks.refine import difference_mask, refine_mask
from defectforge.params.refine import RefineParams


def run(p: RefineParams, split: str | os.PathLike, generated: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Refined masks into ``out_dir``; returns its manifest (root: the common parent folder).

    Per sample (``mask_source`` records which rule made the mask):

    1. ``attention`` - Eq. 13: the defect tokens' cross-attention, resized, thresholded
       at ``threshold`` inside the target mask, light morphology; accepted when it keeps
       at least ``min_area_ratio`` of the target mask;
    2. ``difference`` - otherwise (``fallback: difference``): where the generation
       actually changed the normal image inside the target mask. Needed when the
       joint softmax was never trained (``finetune.attention_loss: 0``): the defect
       tokens' share is then flat at about 1/2 and Eq. 13 keeps all or nothing
       (experiments/eq13-attention/eq13-attention.md);
    3. ``raw-fallback`` - neither found anything: the raw target mask is kept and the
       quality stage flags the sample;
    4. ``raw`` - the method saved no attention (copy-paste: its mask is exact).

    ``out_dir`` must be new, empty or made by defectforge, and apart from the folders
    it reads (the generated root, the source dataset root).
    """
    generated, out_dir = Path(generated), Path(out_dir)
    gen_info = manifest_info(generated)
    if gen_info["kind"] != "synthetic":
        raise DataError(f"{generated}: is a {gen_info['kind']} manifest; refine needs the generate stage's folder or manifest")
    gen_root = Path(gen_info["dataset_root"])
    src_root = Path(require_kind(split, "split", "refine --split")["dataset_root"])
    sources = read_manifest(split, columns=["image_id", "image_path"]).to_pandas().set_index("image_id")["image_path"]
    root = Path(os.path.commonpath([gen_root.resolve(), out_dir.resolve()]))
    df = read_manifest(generated).to_pandas().sort_values("sample_id").reset_index(drop=True)
    # never inside (or holding) the folders it reads: replacing it would delete their files
    with atomic_dir(out_dir, "refine output folder", inputs=(gen_root, src_root, generated if generated.is_dir() else None)) as tmp:
        rows = [_refine_row(p, r, gen_root, src_root, root, sources, tmp, out_dir) for r in df.to_dict(orient="records")]
        # tmp and out_dir are siblings under root, so the stored relative root stays right after the swap
        write_manifest(rows, tmp / "manifest.parquet", kind="synthetic", dataset_root=root)
    final = out_dir / "manifest.parquet"
    check_manifest(final)
    return final


def _refine_row(p: RefineParams, r: dict, gen_root: Path, src_root: Path, root: Path, sources, tmp: Path, out_dir: Path) -> dict:
    """One manifest row with its dataset mask (written under ``tmp``) and ``mask_source``."""
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
    return r


def _with_morphology(make, radius: int, enough) -> np.ndarray:
    """``make(radius)``; if the morphology erased a thin defect (a crack, a scratch), ``make(0)``."""
    mask = make(radius)
    return mask if enough(mask) or radius == 0 else make(0)

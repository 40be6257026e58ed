"""Parquet schemas of the three manifests defectforge writes.

* ``source``    — one row per real image found by an adapter (ingest stage);
* ``split``     — the source rows plus the seeded ``split``/``fold`` assignment;
* ``synthetic`` — one row per generated sample (generate / refine / quality / release).

Every file carries its kind, the schema version and the dataset root (relative to
the file's own folder) in the Parquet key-value metadata, so a manifest can be read
and validated on its own. All paths in a manifest are POSIX paths relative to the
dataset root; a path that escapes the root is rejected (:func:`defectforge.manifest.paths.check_relpath`).
"""

from __future__ import annotations

import pyarrow as pa

from defectforge.errors import ManifestError

SCHEMA_VERSION = "1.1"  # 1.1: synthetic mask_origin
META_KIND = b"defectforge.kind"
META_VERSION = b"defectforge.schema_version"
META_ROOT = b"defectforge.dataset_root"
META_DATASET_VERSION = b"defectforge.dataset_version"

SOURCE_FIELDS = [
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("defect_type", pa.string(), nullable=False),
    pa.field("image_path", pa.string(), nullable=False),
    pa.field("mask_path", pa.string()),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("mask_sha256", pa.string()),
    pa.field("mask_area", pa.int64(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),
]

SPLIT_FIELDS = SOURCE_FIELDS + [
    pa.field("split", pa.string(), nullable=False),
    pa.field("fold", pa.int32(), nullable=False),
]

# Per-sample quality figures are real columns (null until the quality stage ran).
QC_FIELDS = [
    pa.field("qc_bg_psnr", pa.float64()),
    pa.field("qc_bg_exact", pa.bool_()),
    pa.field("qc_defect_contrast", pa.float64()),
    pa.field("qc_mask_area_ratio", pa.float64()),
    pa.field("qc_mask_inside_frac", pa.float64()),
    pa.field("qc_attention_inside", pa.float64()),
    # realism figures inside the defect mask (defectforge.metrics.realism.defect_stats);
    # manifests written before these columns existed read them as null
    pa.field("qc_saturated_share", pa.float64()),
    pa.field("qc_in_mask_mean", pa.float64()),
    pa.field("qc_contrast_ring", pa.float64()),
    pa.field("qc_edge_sharpness", pa.float64()),
    pa.field("qc_chroma", pa.float64()),
    pa.field("qc_chroma_source", pa.float64()),
    pa.field("qc_speckle", pa.float64()),
    pa.field("qc_saturated", pa.bool_()),
    pa.field("qc_colour_drift", pa.bool_()),
    pa.field("qc_speckled", pa.bool_()),
    pa.field("qc_pass", pa.bool_()),
    pa.field("qc_reasons", pa.list_(pa.string())),
]
QC_COLUMNS = [f.name for f in QC_FIELDS]

SYNTHETIC_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("dataset_version", pa.string()),
    pa.field("category", pa.string(), nullable=False),
    pa.field("defect_type", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("image_path", pa.string(), nullable=False),
    pa.field("mask_path", pa.string(), nullable=False),
    pa.field("raw_mask_path", pa.string(), nullable=False),
    pa.field("attention_path", pa.string()),
    pa.field("source_image_id", pa.string(), nullable=False),
    pa.field("source_sha256", pa.string(), nullable=False),
    pa.field("defect_source_id", pa.string()),
    pa.field("image_sha256", pa.string(), nullable=False),
    pa.field("mask_sha256", pa.string(), nullable=False),
    pa.field("raw_mask_sha256", pa.string(), nullable=False),
    pa.field("seed", pa.int64(), nullable=False),
    pa.field("params_sha256", pa.string(), nullable=False),
    pa.field("checkpoint_sha256", pa.string()),
    pa.field("method_config", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("mask_area", pa.int64(), nullable=False),
    pa.field("raw_mask_area", pa.int64(), nullable=False),
    # where the target mask came from: "augmented-real/<placement>" (a real training mask of the
    # type, flipped/rotated/scaled, placed on the foreground, anywhere, or by the type's location
    # prior) or the method's own mask model ("cutpaste-patch", "cutpaste-scar", "perlin-noise")
    pa.field("mask_origin", pa.string()),
    # how mask_path was made: "raw" (the method's own mask, exact: copy-paste), "attention"
    # (Eq. 13 from the defect tokens' cross-attention), "difference" (where the image
    # changed inside the target mask, when attention found nothing) or "raw-fallback"
    # (nothing found; the raw target mask is kept and the quality stage flags the sample)
    pa.field("mask_source", pa.string()),
] + QC_FIELDS

KINDS = {"source": SOURCE_FIELDS, "split": SPLIT_FIELDS, "synthetic": SYNTHETIC_FIELDS}
PATH_COLUMNS = {
    "source": ("image_path", "mask_path"),
    "split": ("image_path", "mask_path"),
    "synthetic": ("image_path", "mask_path", "raw_mask_path", "attention_path"),
}
ID_COLUMN = {"source": "image_id", "split": "image_id", "synthetic": "sample_id"}
# Storage only (the schema and the values do not depend on it), see manifest.io:
# the order rows are written in - a synthetic manifest by (category, defect type), so a
# filtered read touches only the row groups of that pair. Source and split manifests
# keep the order they are given in: the pretrain and detector stages iterate over their
# rows, and a different order would train different models.
SORT_KEYS: dict[str, tuple[str, ...]] = {"source": (), "split": (), "synthetic": ("category", "defect_type")}
# columns whose values are (nearly) all different: no dictionary, no statistics ...
UNIQUE_COLUMNS = {
    "source": ("image_id", "image_sha256", "mask_sha256"),
    "split": ("image_id", "image_sha256", "mask_sha256"),
    "synthetic": ("sample_id", "image_sha256", "mask_sha256", "raw_mask_sha256"),
}
# ... and of those, the hex digests: not compressed either (nothing to gain)
HEX_COLUMNS = {
    "source": ("image_sha256", "mask_sha256"),
    "split": ("image_sha256", "mask_sha256"),
    "synthetic": ("sample_id", "image_sha256", "mask_sha256", "raw_mask_sha256"),
}


def schema_for(kind: str, dataset_root: str = ".", dataset_version: str | None = None) -> pa.Schema:
    """The pyarrow schema of a manifest kind, with version and root in its metadata."""
    if kind not in KINDS:
        raise ManifestError(f"unknown manifest kind {kind!r}; allowed: {sorted(KINDS)}")
    meta = {META_KIND: kind.encode(), META_VERSION: SCHEMA_VERSION.encode(), META_ROOT: dataset_root.encode()}
    if dataset_version is not None:
        meta[META_DATASET_VERSION] = dataset_version.encode()
    return pa.schema(KINDS[kind], metadata=meta)

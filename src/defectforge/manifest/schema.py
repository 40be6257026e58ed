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

_TYPES = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(),
          "strings": pa.list_(pa.string())}


def _fields(spec: str) -> list[pa.Field]:
    """Fields from ``name:type`` words in order; a trailing ``!`` means the column may not be null."""
    out = []
    for word in spec.split():
        name, kind = word.split(":")
        out.append(pa.field(name, _TYPES[kind.rstrip("!")], nullable=not kind.endswith("!")))
    return out


SOURCE_FIELDS = _fields("""
    image_id:string! category:string! defect_type:string! image_path:string! mask_path:string
    width:int32! height:int32! image_sha256:string! mask_sha256:string mask_area:int64! origin:string!
""")

SPLIT_FIELDS = SOURCE_FIELDS + _fields("split:string! fold:int32!")

# Per-sample quality figures are real columns (null until the quality stage ran). The realism figures inside
# the defect mask (defectforge.metrics.realism.defect_stats, qc_saturated_share to qc_chroma_source) read as
# null in manifests written before they existed.
QC_FIELDS = _fields("""
    qc_bg_psnr:float64 qc_bg_exact:bool qc_defect_contrast:float64 qc_mask_area_ratio:float64
    qc_mask_inside_frac:float64 qc_attention_inside:float64
    qc_saturated_share:float64 qc_in_mask_mean:float64 qc_contrast_ring:float64 qc_edge_sharpness:float64 qc_chroma:float64
    qc_chroma_source:float64
    qc_speckle:float64 qc_saturated:bool qc_colour_drift:bool qc_speckled:bool qc_pass:bool qc_reasons:strings
""")
QC_COLUMNS = [f.name for f in QC_FIELDS]

# mask_origin: where the target mask came from: "augmented-real/<placement>" (a real training mask of the type,
# flipped/rotated/scaled, placed on the foreground, anywhere, or by the type's location prior) or the method's own
# mask model ("cutpaste-patch", "cutpaste-scar", "perlin-noise").
# mask_source: how mask_path was made: "raw" (the method's own mask, exact: copy-paste), "attention" (Eq. 13 from the
# defect tokens' cross-attention), "difference" (where the image changed inside the target mask, when attention found
# nothing) or "raw-fallback" (nothing found; the raw target mask is kept and the quality stage flags the sample).
SYNTHETIC_FIELDS = _fields("""
    sample_id:string! dataset_version:string category:string! defect_type:string! method:string!
    image_path:string! mask_path:string! raw_mask_path:string! attention_path:string
    source_image_id:string! source_sha256:string! defect_source_id:string
    image_sha256:string! mask_sha256:string! raw_mask_sha256:string!
    seed:int64! params_sha256:string! checkpoint_sha256:string method_config:string!
    width:int32! height:int32! mask_area:int64! raw_mask_area:int64! mask_origin:string mask_source:string
""") + QC_FIELDS

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

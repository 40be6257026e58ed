"""Atomic, sharded Parquet writing and filtered reading of manifests.

Writing: every file is written to a temporary name in its destination folder and
renamed into place (``os.replace`` is atomic on POSIX), so a killed run never leaves a
torn manifest. :class:`ShardedWriter` writes one file per shard (``part-00000.parquet``
...); a rerun asks :meth:`ShardedWriter.done` and skips finished shards, so rows are
never duplicated. :func:`assemble` concatenates the shards into one manifest file,
again atomically.

Reading: :func:`read_manifest` opens a file or a folder of shards as a
``pyarrow.dataset`` and pushes filters down to Parquet (row-group statistics), so
selecting one defect type never reads the whole table into memory first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from defectforge.data.io import umask_mode
from defectforge.errors import ManifestError
from defectforge.manifest.schema import (
    ID_COLUMN,
    KINDS,
    META_DATASET_VERSION,
    META_KIND,
    META_ROOT,
    META_VERSION,
    PATH_COLUMNS,
    SCHEMA_VERSION,
    check_relpath,
    schema_for,
)


def _to_table(rows: pd.DataFrame | pa.Table | list[dict], schema: pa.Schema, source: str) -> pa.Table:
    if isinstance(rows, pa.Table):
        df = rows.to_pandas()
    elif isinstance(rows, pd.DataFrame):
        df = rows
    else:
        df = pd.DataFrame(list(rows))
    names = schema.names
    missing = [n for n in names if n not in df.columns and not schema.field(n).nullable]
    if missing:
        raise ManifestError(f"{source}: missing required columns {missing}")
    extra = [c for c in df.columns if c not in names]
    if extra:
        raise ManifestError(f"{source}: columns not in the schema: {extra}")
    kind = schema.metadata[META_KIND].decode()
    for col in PATH_COLUMNS[kind]:
        if col in df.columns:
            df = df.assign(**{col: [check_relpath(p, column=col, source=source) if _present(p) else None for p in df[col]]})
    arrays = []
    for f in schema:
        if f.name in df.columns:
            values = [None if not _present(v) else v for v in df[f.name].tolist()] if f.nullable else df[f.name].tolist()
            try:
                arrays.append(pa.array(values, type=f.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
                raise ManifestError(f"{source}: column {f.name!r} does not fit {f.type}: {exc}") from None
        else:
            arrays.append(pa.nulls(len(df), type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _present(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and v != v:
        return False
    return v is not pd.NA


def _relative_root(file: Path, dataset_root: str | os.PathLike) -> str:
    return Path(os.path.relpath(Path(dataset_root).resolve(), file.parent.resolve())).as_posix()


def write_manifest(
    rows: pd.DataFrame | pa.Table | list[dict],
    path: str | os.PathLike,
    *,
    kind: str,
    dataset_root: str | os.PathLike,
    dataset_version: str | None = None,
) -> Path:
    """Atomically write one manifest file of ``kind`` whose paths are relative to ``dataset_root``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema_for(kind, _relative_root(path, dataset_root), dataset_version)
    table = _to_table(rows, schema, str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, umask_mode())  # mkstemp makes 0600; a shared folder needs what the umask says
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


class ShardedWriter:
    """One Parquet file per shard in ``manifest_dir``; finished shards are skipped on rerun.

    >>> w = ShardedWriter(tmp / "manifest", kind="synthetic", dataset_root=tmp)  # doctest: +SKIP
    >>> if not w.done(0): w.write(0, rows)                                      # doctest: +SKIP
    """

    def __init__(self, manifest_dir: str | os.PathLike, *, kind: str, dataset_root: str | os.PathLike, clean: bool = True):
        if kind not in KINDS:
            raise ManifestError(f"unknown manifest kind {kind!r}")
        self.dir = Path(manifest_dir)
        self.kind = kind
        self.dataset_root = Path(dataset_root)
        self.dir.mkdir(parents=True, exist_ok=True)
        # A killed run may leave temporaries behind: they were never renamed, so they
        # hold no committed rows and are removed - by the one process that owns the run
        # (``clean``). A fan-out worker must not: the temporaries of the other workers'
        # shards in flight look the same (that race made the two-worker test flaky).
        if clean:
            for stale in self.dir.glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def shard_path(self, index: int) -> Path:
        return self.dir / f"part-{index:05d}.parquet"

    def done(self, index: int) -> bool:
        return self.shard_path(index).is_file()

    def write(self, index: int, rows: pd.DataFrame | list[dict]) -> Path:
        return write_manifest(rows, self.shard_path(index), kind=self.kind, dataset_root=self.dataset_root)

    def shards(self) -> list[Path]:
        return sorted(self.dir.glob("part-*.parquet"))


def shard_files(folder: str | os.PathLike) -> list[Path]:
    """Committed shard files under ``folder`` (any depth: one sub-folder per method), sorted."""
    return sorted(Path(folder).rglob("part-*.parquet"))


def assemble(
    shard_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    kind: str,
    dataset_root: str | os.PathLike,
    dataset_version: str | None = None,
    expected_shards: int | None = None,
) -> Path:
    """Concatenate the shards of ``shard_dir`` into one manifest file, atomically."""
    shards = shard_files(shard_dir)
    if expected_shards is not None and len(shards) != expected_shards:
        raise ManifestError(f"{shard_dir}: {len(shards)} shards found, {expected_shards} expected (run not finished)")
    tables = [pq.read_table(s) for s in shards]
    if not tables:
        raise ManifestError(f"{shard_dir}: no shards to assemble")
    df = pa.concat_tables([t.replace_schema_metadata(None) for t in tables]).to_pandas()
    idcol = ID_COLUMN[kind]
    dup = df[idcol][df[idcol].duplicated()].tolist()
    if dup:
        raise ManifestError(f"{shard_dir}: duplicate {idcol} across shards: {dup[:5]}")
    if dataset_version is not None and "dataset_version" in df.columns:
        df["dataset_version"] = dataset_version
    return write_manifest(df, out, kind=kind, dataset_root=dataset_root, dataset_version=dataset_version)


def manifest_info(path: str | os.PathLike) -> dict[str, str]:
    """Kind, schema version, absolute dataset root and dataset version of a manifest file or shard folder."""
    path = Path(path)
    files = [path] if path.is_file() else shard_files(path)
    if not files:
        raise ManifestError(f"{path}: no manifest file found")
    try:
        meta = pq.read_schema(files[0]).metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{files[0]}: not a readable Parquet file ({exc})") from None
    if META_KIND not in meta:
        raise ManifestError(f"{files[0]}: not a defectforge manifest (no {META_KIND.decode()} metadata)")
    stored_root = meta.get(META_ROOT, b".").decode()
    if os.path.isabs(stored_root):  # write_manifest always stores it relative to the file's folder
        raise ManifestError(f"{files[0]}: dataset_root metadata {stored_root!r} is absolute; it must be relative to the manifest's folder")
    root = (files[0].parent / stored_root).resolve()
    info = {
        "kind": meta[META_KIND].decode(),
        "schema_version": meta.get(META_VERSION, b"").decode(),
        "dataset_root": str(root),
    }
    if META_DATASET_VERSION in meta:
        info["dataset_version"] = meta[META_DATASET_VERSION].decode()
    if info["schema_version"].split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ManifestError(f"{files[0]}: schema version {info['schema_version']} is not readable by this defectforge ({SCHEMA_VERSION})")
    return info


def _filter_expression(filters: dict[str, Any] | None) -> ds.Expression | None:
    expr = None
    for col, value in (filters or {}).items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, set)):
            term = ds.field(col).isin(list(value))
        else:
            term = ds.field(col) == value
        expr = term if expr is None else expr & term
    return expr


def read_manifest(
    path: str | os.PathLike,
    *,
    filters: dict[str, Any] | None = None,
    columns: Iterable[str] | None = None,
) -> pa.Table:
    """Read a manifest file or shard folder; ``filters`` ({column: value or list}) are pushed down.

    Paths in the result stay relative to the dataset root (see :func:`manifest_info`).
    """
    info = manifest_info(path)
    schema = schema_for(info["kind"])
    unknown = [c for c in (filters or {}) if c not in schema.names]
    if unknown:
        raise ManifestError(f"{path}: cannot filter on unknown columns {unknown}")
    p = Path(path)
    source = str(p) if p.is_file() else [str(s) for s in shard_files(p)]
    dataset = ds.dataset(source, format="parquet", schema=schema)
    table = dataset.to_table(filter=_filter_expression(filters), columns=list(columns) if columns else None)
    for col in PATH_COLUMNS[info["kind"]]:
        if col in table.column_names:
            for v in table.column(col).to_pylist():
                check_relpath(v, column=col, source=str(path))
    return table

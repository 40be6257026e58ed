"""Atomic, sharded Parquet writing and filtered reading of manifests.

Writing: every file is written to a temporary name in its destination folder and
renamed into place (``os.replace`` is atomic on POSIX), so a killed run never leaves a
torn manifest. :class:`ShardedWriter` writes one file per shard (``part-00000.parquet``
...); a rerun asks :meth:`ShardedWriter.done` and skips finished shards, so rows are
never duplicated. :func:`assemble` concatenates the shards into one manifest file,
again atomically. Rows are checked and converted a column at a time (pyarrow, numpy:
no Python loop over the values), and a synthetic manifest is stored ordered by
(category, defect type) in row groups of :data:`ROW_GROUP_SIZE` rows.

Reading: :func:`read_manifest` opens a file or a folder of shards as a
``pyarrow.dataset`` and pushes filters down to Parquet (row-group statistics), so
selecting one defect type never reads the whole table into memory first. Row
order is not part of a manifest's contract: readers that need one sort.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from defectforge.data.files import umask_mode
from defectforge.errors import ManifestError
from defectforge.manifest.schema import (
    HEX_COLUMNS,
    ID_COLUMN,
    KINDS,
    META_DATASET_VERSION,
    META_KIND,
    META_ROOT,
    META_VERSION,
    PATH_COLUMNS,
    SCHEMA_VERSION,
    SORT_KEYS,
    UNIQUE_COLUMNS,
    schema_for,
)
from defectforge.manifest.paths import check_paths, check_relpath, to_numpy_bool

if TYPE_CHECKING:
    import pandas as pd
# pandas is imported where rows are written, never at import: reading a manifest (the
# consumer side, defectforge.load) needs pyarrow and numpy only.


def _to_table(rows: pd.DataFrame | pa.Table | list[dict], schema: pa.Schema, source: str) -> pa.Table:
    """``rows`` as a table of ``schema``: one pyarrow conversion per column, no loop over values.

    Same rules as the per-value conversion it replaced (:func:`_column_by_value`, still
    used for a column the fast conversion cannot take as is, so the result and the error
    messages stay the same): a missing value (None, NaN, pd.NA) is null in a nullable
    column, every path is checked and normalised (:func:`check_paths`), a value that does
    not fit its column's type is one error naming the file and the column. A required
    column with a missing value is refused here, naming the row (pyarrow's writer used
    to fail on it with a bare ArrowInvalid).
    """
    import pandas as pd

    if isinstance(rows, pa.Table):
        df = rows
    elif isinstance(rows, pd.DataFrame):
        df = rows
    else:
        df = pd.DataFrame(list(rows))
    columns = df.column_names if isinstance(df, pa.Table) else list(df.columns)
    names = schema.names
    missing = [n for n in names if n not in columns and not schema.field(n).nullable]
    if missing:
        raise ManifestError(f"{source}: missing required columns {missing}")
    extra = [c for c in columns if c not in names]
    if extra:
        raise ManifestError(f"{source}: columns not in the schema: {extra}")
    n = df.num_rows if isinstance(df, pa.Table) else len(df)
    kind = schema.metadata[META_KIND].decode()
    paths = [c for c in PATH_COLUMNS[kind] if c in columns]
    arrays: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name in paths + [f.name for f in schema if f.name in columns and f.name not in paths]:  # paths first, as before
        arrays[name] = _column(df, schema.field(name), source, is_path=name in paths)
    return pa.Table.from_arrays([arrays[f.name] if f.name in arrays else pa.nulls(n, type=f.type) for f in schema], schema=schema)


_NUMPY_KINDS = {"int": "iu", "float": "iuf", "bool": "b"}


def _fast_ok(values: pd.Series, field: pa.Field) -> bool:
    """Whether pyarrow's whole-column conversion of ``values`` gives what the per-value one gives."""
    import pandas as pd

    dtype = values.dtype
    if dtype == object:
        return True  # Python objects: the same converter as a list, value by value (in C)
    if pa.types.is_integer(field.type):
        kinds = _NUMPY_KINDS["int"]
    elif pa.types.is_floating(field.type):
        kinds = _NUMPY_KINDS["float"]
    elif pa.types.is_boolean(field.type):
        kinds = _NUMPY_KINDS["bool"]
    elif pa.types.is_string(field.type):
        return isinstance(dtype, pd.StringDtype) or (isinstance(dtype, pd.ArrowDtype) and pa.types.is_string(dtype.pyarrow_dtype))
    else:
        return False
    return isinstance(dtype, np.dtype) and dtype.kind in kinds


def _column(df: pd.DataFrame | pa.Table, field: pa.Field, source: str, *, is_path: bool) -> pa.Array | pa.ChunkedArray:
    """One column of ``df`` as ``field``'s type (see :func:`_to_table`)."""
    if isinstance(df, pa.Table):
        col = df.column(field.name)
        if col.type != field.type:
            # what the per-value conversion did with a table: through pandas, this column only
            import pandas as pd

            return _column(pd.DataFrame({field.name: col.to_pandas()}), field, source, is_path=is_path)
        arr = col
        if pa.types.is_floating(field.type) and pc.any(pc.is_nan(arr)).as_py():
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, field.type), arr)  # NaN is missing, as in pandas
    else:
        values = df[field.name]
        arr = None
        if _fast_ok(values, field):
            try:
                # a path column turns every missing value into None (then null), required or not
                arr = pa.array(values, type=field.type, from_pandas=field.nullable or is_path)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                arr = None  # the per-value conversion below raises the error it always raised
        if arr is None:
            return _column_by_value(values, field, source, is_path=is_path)
    if is_path:
        arr = check_paths(arr, column=field.name, source=source)
    if not field.nullable and arr.null_count:
        if not isinstance(df, pa.Table):
            _column_by_value(df[field.name], field, source, is_path=is_path)  # its error where it had one
        row = int(np.flatnonzero(to_numpy_bool(pc.is_null(arr)))[0])
        raise ManifestError(f"{source}: column {field.name!r} is required but row {row} has no value ({arr.null_count} rows without one)")
    return arr


def _column_by_value(values: pd.Series, field: pa.Field, source: str, *, is_path: bool) -> pa.Array:
    """The per-value conversion (the fast one's reference; used where that one cannot go)."""
    vals = values.tolist()
    if is_path:
        vals = [check_relpath(p, column=field.name, source=source) if _present(p) else None for p in vals]
    if field.nullable:
        vals = [None if not _present(v) else v for v in vals]
    try:
        arr = pa.array(vals, type=field.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise ManifestError(f"{source}: column {field.name!r} does not fit {field.type}: {exc}") from None
    if not field.nullable and arr.null_count:
        row = int(np.flatnonzero(to_numpy_bool(pc.is_null(arr)))[0])
        raise ManifestError(f"{source}: column {field.name!r} is required but row {row} has no value ({arr.null_count} rows without one)")
    return arr


def _present(v: Any) -> bool:
    if v is None:
        return False
    if isinstance(v, float) and v != v:
        return False
    import pandas as pd

    return v is not pd.NA


# ---------------------------------------------------------------- Parquet layout
# Rows of a synthetic manifest are stored ordered by SORT_KEYS (stable: ties keep their
# order), so a filter on category / defect type reads one or two row groups of
# ROW_GROUP_SIZE rows instead of the whole file. Dictionary encoding and statistics only
# where they pay: not on per-row unique values (ids, per-file digests, paths); hex
# digests are stored uncompressed (snappy finds nothing to shorten in them and costs
# a third of the write).
ROW_GROUP_SIZE = 16384


def _sort_order(table: pa.Table, keys: tuple[str, ...]) -> np.ndarray | None:
    """Row indices that order ``table`` stably by ``keys`` (string columns, code-point order,
    as pandas sorts); None when it is already in that order."""
    if not keys or table.num_rows < 2:
        return None
    composite = np.zeros(table.num_rows, np.int64)
    for key in keys:
        enc = table.column(key).combine_chunks().dictionary_encode()
        words = enc.dictionary.to_pylist()
        rank = np.empty(len(words), np.int64)
        rank[np.argsort(np.array(words, dtype=object), kind="stable")] = np.arange(len(words))
        composite = composite * max(len(words), 1) + rank[enc.indices.to_numpy(zero_copy_only=False)]
    if np.all(composite[1:] >= composite[:-1]):
        return None
    if composite.max() < 2**16:
        composite = composite.astype(np.uint16)  # numpy's stable sort is a radix sort on 16 bits
    return np.argsort(composite, kind="stable")


def _write_parquet(table: pa.Table, where: str, schema: pa.Schema, order: np.ndarray | None) -> None:
    """``table`` (rows in ``order``) as Parquet: one row group at a time, so the reordering
    never copies the whole table (a row group's rows are gathered, encoded, dropped)."""
    options = _write_options(schema)
    size = options.pop("row_group_size")
    with pq.ParquetWriter(where, table.schema, **options) as writer:
        if table.num_rows == 0:
            writer.write_table(table)  # one empty row group, as pq.write_table writes
        for start in range(0, table.num_rows, size):
            if order is None:
                group = table.slice(start, size)
            else:
                rows, plans = order[start : start + size], {}
                group = pa.Table.from_arrays([_take(table.column(i), rows, plans) for i in range(table.num_columns)], schema=table.schema)
            writer.write_table(group, row_group_size=size)


def _take(column: pa.ChunkedArray, rows: np.ndarray, plans: dict) -> pa.Array:
    """``column[rows]`` from the chunks that hold them (pyarrow's take on a chunked column
    concatenates all its chunks first, on every call). ``plans`` caches, per chunk layout,
    which rows each chunk gives and how to put them back in order."""
    if column.num_chunks == 1:
        if None not in plans:
            plans[None] = pa.array(rows)
        return column.chunk(0).take(plans[None])
    layout = tuple(len(c) for c in column.chunks)
    if layout not in plans:
        bounds = np.cumsum((0,) + layout)
        which = np.searchsorted(bounds, rows, side="right") - 1
        by_chunk = np.argsort(which, kind="stable")
        back = np.empty_like(by_chunk)
        back[by_chunk] = np.arange(len(by_chunk))
        parts = [(int(k), pa.array(rows[which == k] - bounds[k])) for k in np.unique(which)]
        plans[layout] = (parts, pa.array(back))
    parts, back = plans[layout]
    return pa.concat_arrays([column.chunk(k).take(local) for k, local in parts]).take(back)


def _write_options(schema: pa.Schema) -> dict[str, Any]:
    kind = schema.metadata[META_KIND].decode()
    plain = set(UNIQUE_COLUMNS[kind]) | set(PATH_COLUMNS[kind])
    hexes = set(HEX_COLUMNS[kind])
    return {
        "row_group_size": ROW_GROUP_SIZE,
        "use_dictionary": [f.name for f in schema if f.name not in plain and (pa.types.is_string(f.type) or pa.types.is_list(f.type))],
        "write_statistics": [f.name for f in schema if f.name not in plain],
        "compression": {f.name: ("none" if f.name in hexes else "snappy") for f in schema},
    }


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
    order = _sort_order(table, SORT_KEYS[kind])
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, umask_mode())  # mkstemp makes 0600; a shared folder needs what the umask says
    os.close(fd)
    try:
        _write_parquet(table, tmp, schema, order)
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
    tables = [read_parquet(s) for s in shards]
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


# ---------------------------------------------------------------- reading Parquet files
# Every Parquet file defectforge reads (manifests, their shards, qc tables) is opened
# through these two, so a file that is not Parquet, or is truncated or torn, is one
# ManifestError naming it, never pyarrow's bare ArrowInvalid.
_UNREADABLE = (pa.ArrowException, OSError, ValueError)


def _unreadable(path: str | os.PathLike, exc: BaseException) -> ManifestError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ManifestError(f"{path}: not a readable Parquet file ({first})")


def _check_regular(path: str | os.PathLike) -> None:
    """Refuse (before opening: opening a fifo blocks) a path that is not a regular file."""
    from defectforge.data.files import not_regular

    why = not_regular(path)
    if why is not None:
        raise ManifestError(f"{path}: not a regular file ({why}); a manifest is a Parquet file or a folder of them")


def read_parquet_schema(path: str | os.PathLike) -> pa.Schema:
    """The stored schema (with metadata) of the Parquet file ``path``; a file that is not one is one ManifestError."""
    _check_regular(path)
    try:
        return pq.read_schema(path)
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """The Parquet file ``path`` as a table (``columns``: only those); a file that is not Parquet, or
    is truncated, is one ManifestError naming it."""
    _check_regular(path)
    try:
        return pq.read_table(path, columns=columns)
    except _UNREADABLE as exc:
        if "No match for FieldRef" in str(exc):
            raise ManifestError(f"{path}: has no column(s) {columns}") from None
        raise _unreadable(path, exc) from None


def manifest_info(path: str | os.PathLike) -> dict[str, str]:
    """Kind, schema version, absolute dataset root and dataset version of a manifest file or shard folder."""
    path = Path(path)
    files = [path] if path.is_file() else shard_files(path)
    if not files:
        raise ManifestError(f"{path}: no manifest file found")
    meta = read_parquet_schema(files[0]).metadata or {}
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


def _type_problem(source: str | list[str], schema: pa.Schema) -> str | None:
    """Which stored column cannot be read as the schema's type, in words (None: none found)."""
    for f in [source] if isinstance(source, str) else source:
        stored = read_parquet_schema(f)
        for field in stored:
            if field.name in schema.names and not field.type.equals(schema.field(field.name).type):
                want = schema.field(field.name).type
                try:
                    read_parquet(f, columns=[field.name]).column(0).cast(want)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                    return (f"column {field.name!r} is stored as {field.type} and cannot be read as {want} "
                            f"({str(exc).splitlines()[0]})")
    return None


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
    for f in [source] if isinstance(source, str) else source:
        _check_regular(f)  # a fifo named like a shard would block the reader
    try:
        dataset = ds.dataset(source, format="parquet", schema=schema)
        table = dataset.to_table(filter=_filter_expression(filters), columns=list(columns) if columns else None)
    except _UNREADABLE as exc:
        # a shard that is not Parquet (junk named like one, a torn copy) is named by the
        # schema read (ManifestError); else a column stored as another type; else pyarrow's first line
        raise ManifestError(f"{path}: {_type_problem(source, schema) or str(exc).splitlines()[0]}") from None
    for col in PATH_COLUMNS[info["kind"]]:
        if col in table.column_names:
            check_paths(table.column(col), column=col, source=str(path))
    return table

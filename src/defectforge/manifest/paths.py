"""Path safety of manifests: every path a manifest holds stays inside its dataset root.

* :func:`check_relpath` / :func:`check_paths`: a stored path is POSIX, relative and
  normal; one that is absolute or climbs out of the root (``..``) is refused, one value
  or a whole Arrow column at a time (row by row only where a byte test flags a row);
* :func:`check_rows_confined`: every row's file resolves, symlinks followed, inside the
  real dataset root, so a link planted in the root that leads out is never read;
* :func:`check_rows_regular`: every row's file is a regular file (never a fifo, device,
  socket or folder), decided by ``stat`` without opening it;
* :func:`check_root`: the dataset root a manifest names does not climb above its project
  or lead out of it through a symlink (:func:`project_of`, :func:`inside`).

Reading and writing the Parquet files is :mod:`defectforge.manifest.io`; both use these
checks, and so does the consumer side (:mod:`defectforge.publish.consume`).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from defectforge.data.files import OWNED
from defectforge.errors import ManifestError
from defectforge.manifest.schema import META_ROOT, PATH_COLUMNS

if TYPE_CHECKING:
    import pandas as pd


def check_relpath(path: str | None, *, column: str = "path", source: str = "manifest") -> str | None:
    """Return ``path`` normalised; raise ManifestError if absolute or escaping the root."""
    if path is None:
        return None
    p = str(path).replace("\\", "/")
    norm = posixpath.normpath(p)
    if p.startswith("/") or (len(p) > 1 and p[1] == ":") or norm == ".." or norm.startswith("../"):
        raise ManifestError(f"{source}: {column} {path!r} escapes the dataset root (paths must be relative and stay inside it)")
    return norm


def to_numpy_bool(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- paths, vectorised
# check_relpath changes or refuses a path only if it is empty, absolute, starts with a
# drive letter, holds a backslash, '//' or a '.' / '..' segment, or ends with '/'. Those
# rows are found with byte tests on the Arrow buffers (a superset: a row flagged by
# mistake is merely checked one by one) and only they go through check_relpath, in row
# order, so the first bad row raises the same error as before.
_SLASH, _DOT, _COLON = ord("/"), ord("."), ord(":")
_BACKSLASH, _BLOCK = ord("\\"), 1 << 20
_INNER_RE = r"\\|//|/\.\.?/"


def _has_inner(body: np.ndarray) -> bool:
    """Whether the bytes hold a backslash, '//' or '/.' ('/./', '/../'), anywhere (block by
    block, so the temporaries stay in cache)."""
    for start in range(0, len(body), _BLOCK):
        b = body[start : start + _BLOCK + 1]  # one byte of overlap: a pair across two blocks
        nxt = b[1:]
        if np.any(b == _BACKSLASH) or np.any((b[:-1] == _SLASH) & ((nxt == _SLASH) | (nxt == _DOT))):
            return True
    return False


def _suspect_rows(chunk: pa.Array) -> np.ndarray:
    """Rows of one string array that check_relpath may change or refuse (a superset)."""
    n = len(chunk)
    if n == 0:
        return np.zeros(0, bool)
    buffers = chunk.buffers()
    width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    offsets = np.frombuffer(buffers[1], dtype=width, count=n + 1, offset=chunk.offset * np.dtype(width).itemsize).astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None and buffers[2].size else np.zeros(1, np.uint8)
    starts, ends = offsets[:-1], offsets[1:]
    length = ends - starts
    top = len(data) - 1  # clipped gathers: a byte read past a short row's end is masked by its length below
    first, second = data[np.minimum(starts, top)], data[np.minimum(starts + 1, top)]
    last, before_last = data[np.clip(ends - 1, 0, top)], data[np.clip(ends - 2, 0, top)]
    dot_or_slash_2 = (second == _DOT) | (second == _SLASH)
    dot_or_slash_l = (before_last == _DOT) | (before_last == _SLASH)
    flags = (
        (length == 0)
        | (first == _SLASH)
        | (first >= 0x80)  # a non-ASCII first character: its second character is not the second byte
        | ((length > 1) & (second == _COLON))
        | ((first == _DOT) & ((length == 1) | dot_or_slash_2))
        | ((length > 0) & (last == _SLASH))
        | ((length > 0) & (last == _DOT) & ((length == 1) | dot_or_slash_l))
    )
    if _has_inner(data[offsets[0] : offsets[-1]]):
        flags |= to_numpy_bool(pc.match_substring_regex(chunk, _INNER_RE).fill_null(False))
    if chunk.null_count:
        flags &= to_numpy_bool(chunk.is_valid())
    return flags


def check_paths(arr: pa.Array | pa.ChunkedArray, *, column: str = "path", source: str = "manifest") -> pa.Array | pa.ChunkedArray:
    """:func:`check_relpath` over a string column: the same
    normalised values and the same error (on the first bad row), without a loop over the
    rows that are already relative and normal."""
    chunks = arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]
    out, changed = [], False
    for chunk in chunks:
        rows = np.flatnonzero(_suspect_rows(chunk))
        if len(rows) == 0:
            out.append(chunk)
            continue
        values = chunk.to_pylist()
        for i in rows:
            norm = check_relpath(values[i], column=column, source=source)
            if norm != values[i]:
                values[i], changed = norm, True
        out.append(pa.array(values, type=chunk.type))
    if not changed:
        return arr
    return pa.chunked_array(out, type=arr.type) if isinstance(arr, pa.ChunkedArray) else out[0]


# ---------------------------------------------------------------- confinement
# What a manifest makes us read stays where it belongs. The one copy of these checks:
# ManifestDataset / load (publish.consume) use them too.
_PROJECT_MARKERS = (".git", ".dvc", "dvc.yaml")


def inside(path: str | os.PathLike, base: str | os.PathLike) -> bool:
    """True if ``path`` is ``base`` or below it, both with symlinks resolved."""
    p, b = os.path.realpath(path), os.path.realpath(base)
    return p == b or os.path.commonpath([p, b]) == b


def project_of(manifest: str | os.PathLike) -> Path:
    """The project a manifest lives in: nearest folder up holding .git, .dvc or dvc.yaml; else its own folder."""
    manifest = Path(manifest)
    folder = manifest.resolve() if manifest.is_dir() else manifest.resolve().parent
    for d in (folder, *folder.parents):
        if any((d / m).exists() for m in _PROJECT_MARKERS):
            return d
    return folder


def check_rows_confined(df: pd.DataFrame, root: str | os.PathLike, source: str = "manifest") -> None:
    """Every row's file must resolve (symlinks followed) inside the real dataset root, as ingest
    and ManifestDataset require: a link planted in the root that leads out is never read."""
    idcol = next((c for c in ("sample_id", "image_id") if c in df.columns), None)
    cols = [c for c in dict.fromkeys(c for kind_cols in PATH_COLUMNS.values() for c in kind_cols) if c in df.columns]
    real_root = os.path.realpath(root)
    folders: dict[str, bool] = {}  # each folder resolved once; per file only one lstat (is it a link?)

    def escapes(rel: str) -> bool:
        full = os.path.join(real_root, rel)
        parent = os.path.dirname(full)
        if parent not in folders:
            folders[parent] = not inside(parent, real_root)
        return folders[parent] or (os.path.islink(full) and not inside(full, real_root))

    bad = []
    ids = df[idcol].astype(str).tolist() if idcol else [str(i) for i in range(len(df))]
    for col in cols:
        for rid, rel in zip(ids, df[col].tolist()):
            if isinstance(rel, str) and rel and escapes(rel):
                bad.append((rid, rel))
    if bad:
        rid, rel = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ManifestError(f"{source}: row {rid}: {rel} resolves to {os.path.realpath(os.path.join(real_root, rel))}, outside the "
                            f"dataset root {real_root} (through a symlink){more}; refusing to read it")


def check_rows_regular(df: pd.DataFrame, root: str | os.PathLike, source: str = "manifest") -> None:
    """Every row's existing file must be a regular file (symlinks followed): a fifo would block
    whoever opens it, a device or socket feed it bytes that are no image, a folder is no file.
    Decided by ``os.stat``, nothing is opened. Missing files are left to the suite and the hash
    check (they say "missing"). Raises ManifestError, one line naming the first such row and file."""
    from defectforge.data.files import not_regular

    idcol = next((c for c in ("sample_id", "image_id") if c in df.columns), None)
    cols = [c for c in dict.fromkeys(c for kind_cols in PATH_COLUMNS.values() for c in kind_cols) if c in df.columns]
    ids = df[idcol].astype(str).tolist() if idcol else [str(i) for i in range(len(df))]
    bad = []
    for col in cols:
        for rid, rel in zip(ids, df[col].tolist()):
            if isinstance(rel, str) and rel:
                why = not_regular(os.path.join(root, rel))
                if why is not None:
                    bad.append((rid, col, rel, why))
    if bad:
        rid, col, rel, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ManifestError(f"{source}: row {rid}: {col} {os.path.join(root, rel)} is not a regular file ({why}){more}; "
                            "refusing to read it")


def check_root(path: str | os.PathLike, within: str | os.PathLike | None = None) -> str:
    """The manifest's dataset root, refused when it climbs above ``within`` or leads out of it through a symlink.

    ``within`` defaults to the project holding the manifest (:func:`project_of`, as
    :func:`defectforge.load` confines a path). Refused: a root that is a folder above
    ``within`` (``../../..``) unless defectforge made it (its marker), and a root reached
    through a symlink that resolves outside ``within``. A plain relative root beside the
    project (real data kept elsewhere, ``../shared/data/x``) is accepted; pass ``within`` to
    accept only roots inside one folder. Absolute roots are refused by :func:`manifest_info`.
    """
    import pyarrow.parquet as pq

    from defectforge.manifest.io import manifest_info, shard_files  # reads this module's checks: imported here

    path = Path(path)
    info = manifest_info(path)
    files = [path] if path.is_file() else shard_files(path)
    stored = (pq.read_schema(files[0]).metadata or {}).get(META_ROOT, b".").decode()
    root = info["dataset_root"]
    base = os.path.realpath(within if within is not None else project_of(path))
    real = os.path.realpath(root)
    lexical = os.path.normpath(os.path.join(os.path.realpath(files[0].parent), stored))
    if within is not None and not inside(real, base):
        why = "is outside"
    elif real != base and inside(base, real) and not os.path.isfile(os.path.join(real, OWNED)):
        why = "is a folder above"
    elif real != lexical and not inside(real, base):
        why = "leads through a symlink out of"
    else:
        return root
    raise ManifestError(f"{files[0]}: dataset_root metadata {stored!r} resolves to {real}, which {why} {base}; "
                        "refusing to read files there")

"""Files and folders defectforge writes: content hashes, atomic writes, owned folders.

Every write goes to a temporary file in the destination folder and is renamed into
place, so a killed process never leaves a torn file. A folder defectforge creates as a
whole (:func:`atomic_dir`) is built beside its target, swapped in, and carries an
ownership marker (:data:`OWNED`); a folder without one is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from defectforge.data.codec import encode_png
from defectforge.errors import DataError


_NODE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def node_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, in words ("a fifo", "a folder", "a regular file")."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((what for test, what in _NODE_KINDS if test(mode)), "not a file")


def not_regular(path: str | os.PathLike) -> str | None:
    """None when ``path`` (symlinks followed) is a regular file; else what it is, in words
    ("a fifo", "a character device", "a folder", ...). Missing files give None: the caller's
    open says so. Decided by ``os.stat`` without opening: opening a fifo blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else node_kind(mode)


class NotRegularFile(DataError):
    """A path that should be a regular file is a fifo, a device, a socket or a folder."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes. A path that is not a regular file (a fifo, which would block
    the read forever, a device, a socket, a folder) raises :class:`NotRegularFile`, never opened
    as such: checked with ``stat`` first, and again on the opened descriptor (opened non-blocking)."""
    why = not_regular(path)
    if why is not None:
        raise NotRegularFile(f"{path}: not a regular file ({why})")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # replaced between the stat and the open
        os.close(fd)
        raise NotRegularFile(f"{path}: not a regular file ({node_kind(mode)})")
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def umask_mode(base: int = 0o666) -> int:
    """``base`` less the process umask: the mode ``open()`` would give (mkstemp gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """``path`` if it is missing or a regular file; anything else (``/dev/full``, a fifo,
    a socket, a folder) is refused: an atomic rename would replace the node itself."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows a symlink: a link to a device is refused too
    except FileNotFoundError:
        return path
    except OSError as exc:
        raise DataError(f"{path}: {what} cannot be checked ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, fifo or socket)"
        raise DataError(f"{path}: {what} exists and is {kind}; give a new file path")
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = check_output_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, umask_mode())  # readable by a data team sharing the folder, as the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_png(path: str | os.PathLike, arr: np.ndarray) -> str:
    """Atomically write ``arr`` as PNG; returns the SHA-256 of the written bytes."""
    data = encode_png(arr)
    atomic_write_bytes(Path(path), data)
    return sha256_bytes(data)


def _json_value(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.bool_):
        return bool(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON with sorted keys (numpy scalars allowed): byte-stable for DVC."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_value) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(Path(path), text.encode("utf-8"))


OWNED = ".defectforge"  # marker file in every folder defectforge creates as a whole
_MARK = "made by defectforge: "  # the marker's first line names what the folder is ("refine output folder")


def owned_marker_text(what: str) -> str:
    """The content of the :data:`OWNED` marker of a folder made as ``what``."""
    return f"{_MARK}{what}; the whole folder is replaced on the next run\n"


def _marked_as(folder: Path) -> str | None:
    """What ``folder``'s marker says it was made as; None for an older marker that does not say."""
    with open(folder / OWNED, "rb") as f:
        first = f.read(300).decode("utf-8", "replace").split("\n")[0]
    return first[len(_MARK):].split(";")[0] if first.startswith(_MARK) else None


_PROJECT_MARKERS = (".git", ".dvc", "dvc.yaml")  # a folder holding one is a project's root


def check_out_place(out: str | os.PathLike, what: str = "output folder", inputs=()) -> None:
    """Refuse, in one line and before anything is written, an output folder that no run may replace or fill:
    ``.``, ``..`` or any spelling of the current folder or one holding it (``./``, ``sub/..``, a link
    to it), ``/``, a project's root (a folder holding .git, .dvc or dvc.yaml), and a folder holding
    (or being) one of ``inputs`` (the files and folders the run reads). Symlinks are resolved."""
    path = Path(out)
    real = Path(os.path.realpath(path))
    cwd = Path(os.path.realpath(os.getcwd()))
    why = None
    if real == real.parent:
        why = "is the file system's root"
    elif real == cwd:
        why = "is the current folder"
    elif real in cwd.parents:
        why = "holds the current folder"
    elif path.name in ("", ".", ".."):
        why = f"ends in {path.name or '.'!r} (name the folder itself)"
    elif any((real / m).exists() for m in _PROJECT_MARKERS):
        why = "is a project's root (it holds " + next(m for m in _PROJECT_MARKERS if (real / m).exists()) + ")"
    else:
        for src in inputs:
            if src is not None and (real == Path(os.path.realpath(src)) or real in Path(os.path.realpath(src)).parents):
                why = f"holds the input {src}"
                break
    if why is not None:
        raise DataError(f"{out}: {what} {why}; a run replaces or fills its output folder, so give a folder of its own, "
                        "e.g. --out data/<stage>")


def check_apart(out: str | os.PathLike, what: str, inputs) -> None:
    """Refuse ``out`` if, symlinks resolved, it is one of the folders ``inputs``, inside one, or holds one,
    or is a place no output folder may be (:func:`check_out_place`)."""
    check_out_place(out, what)
    real = Path(os.path.realpath(out))
    for src in inputs:
        if src is None:
            continue
        other = Path(os.path.realpath(src))
        if real == other or other in real.parents or real in other.parents:
            raise DataError(f"{out}: {what} overlaps the input folder {src} (the same folder, or one inside the other); "
                            "give an output folder outside the data it reads")


def claim_dir(
    out_dir: str | os.PathLike, what: str = "output folder", markers: tuple[str, ...] = (), inputs: tuple = ()
) -> Path:
    """Refuse to take over ``out_dir`` unless it is missing, empty, or carries our marker.

    defectforge replaces whole output folders; it must never delete a folder it did
    not create (a user's ``--out`` pointing at their documents). ``out_dir`` itself must
    not be a symlink, and anything that is not a directory (a file, ``/dev/full``) is
    refused. ``inputs`` are the folders the stage reads (dataset roots): after resolving
    symlinks (of ``out_dir``'s parents too), ``out_dir`` must be neither one of them,
    nor inside one, nor hold one. A marker names what the folder was made as: a folder
    made as something else (a copy of the sample dataset given as a refine output) is
    refused too; older markers that do not say are accepted.
    """
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        kind = "a symlink" if out.is_symlink() else "not a directory"
        raise DataError(f"{out}: {what} is {kind}; give a new folder path")
    check_apart(out, what, inputs)
    if out.is_dir() and any(out.iterdir()):
        if not any((out / m).is_file() for m in (OWNED, *markers)):
            raise DataError(f"{out}: {what} exists, is not empty and was not made by defectforge (no {OWNED} marker); "
                            "refusing to replace it - give a new or empty folder")
        made_as = _marked_as(out) if (out / OWNED).is_file() else None
        if made_as is not None and made_as != what:
            raise DataError(f"{out}: {what} is a folder defectforge made as a {made_as}; refusing to replace it - "
                            "give a new or empty folder")
    return out


@contextmanager
def atomic_dir(
    out_dir: str | os.PathLike, what: str = "output folder", markers: tuple[str, ...] = (), inputs: tuple = ()
) -> Iterator[Path]:
    """Build a folder completely, then swap it in: readers never see half of it.

    ``with atomic_dir(out) as tmp:`` yields a fresh sibling ``.<name>.tmp`` folder; on
    success it gets the ownership marker and replaces ``out`` (the old folder is only
    removed after :func:`claim_dir` said it is ours; ``markers``: older marker files that
    also prove it; ``inputs``: folders it must not overlap); on error it is removed and
    ``out`` is untouched.
    """
    out = claim_dir(out_dir, what, markers, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, umask_mode(0o777))
        yield tmp
        (tmp / OWNED).write_text(owned_marker_text(what))
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Image and mask input/output.

Images are handled as ``uint8`` arrays of shape (H, W, 3) (grayscale sources are
replicated to three channels so every method sees one format); masks as ``bool``
arrays of shape (H, W). Every write goes to a temporary file in the destination
folder and is renamed into place, so a killed process never leaves a torn file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from defectforge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # greyscale modes wider than 8 bits


def _grey_to_uint8(im: Image.Image, path: Path, what: str) -> np.ndarray:
    """A 16-bit / 32-bit integer / float greyscale image scaled to uint8 at its real bit depth.

    ``Image.convert("L")`` clips such pixels at 255 (a 16-bit image comes out almost all
    white), so the values are scaled here instead: 16-bit 0..65535 -> 0..255 (rounded),
    32-bit integer images must hold 16-bit values, float images values in [0, 1].
    """
    arr = np.asarray(im)
    if im.mode == "F":
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if not np.isfinite(arr).all() or lo < 0.0 or hi > 1.0:
            raise DataError(f"{path}: floating-point {what} with values outside [0, 1] (min {lo:g}, max {hi:g}); not supported")
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    wide = arr.astype(np.int64)
    if wide.size and (wide.min() < 0 or wide.max() > 65535):
        raise DataError(f"{path}: 32-bit integer {what} with values outside 0..65535 (min {wide.min()}, max {wide.max()}); not supported")
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)


def _decode(path: str | os.PathLike, mode: str, what: str, data: bytes | None = None) -> np.ndarray:
    """Decode the whole file (or ``data``, its bytes) as uint8 in ``mode`` ("RGB" or "L").

    Greyscale images deeper than 8 bits (PNG/TIFF 16-bit: modes ``I;16``, ``I``; ``F``)
    are scaled to 8 bits, not clipped.
    """
    path = Path(path)
    if data is None and not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()
            if im.mode in _HIGH_DEPTH:
                grey = _grey_to_uint8(im, path, what)
                return np.repeat(grey[:, :, None], 3, axis=2) if mode == "RGB" else grey
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: unreadable or corrupt {what} ({exc.__class__.__name__})") from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 (H, W, 3); raises DataError naming the file if unreadable.

    16-bit greyscale sources are scaled to 8 bits (see :func:`_decode`), grey is replicated
    to three channels.
    """
    arr = _decode(path, "RGB", "image")
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: image has no pixels")
    return arr


def read_mask(path: str | os.PathLike, threshold: int = 128) -> np.ndarray:
    """Read a mask as bool (H, W): a pixel is defect where its gray value >= threshold.

    Masks from real datasets are rarely clean 0/255 (JPEG ringing, anti-aliasing), so
    they are always thresholded rather than compared with 255. The threshold is on the
    8-bit scale; 16-bit masks are scaled to it first.
    """
    return _decode(path, "L", "mask") >= threshold


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header only; raises DataError if unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable or corrupt image ({exc.__class__.__name__})") from None


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


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes of a uint8 image (H, W, 3) / (H, W) or a bool mask (stored 0/255).

    PNG encoding with fixed settings is deterministic, so the hash of the bytes is a
    reproducible content id.
    """
    import io

    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        raise ValueError(f"encode_png expects uint8 or bool, got {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


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


def check_apart(out: str | os.PathLike, what: str, inputs) -> None:
    """Refuse ``out`` if, symlinks resolved, it is one of the folders ``inputs``, inside one, or holds one."""
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

"""Dataset adapters: a folder of real images (+ masks) → one canonical source table.

:func:`ingest` reads one of three on-disk layouts and returns a :class:`pandas.DataFrame`
with one row per real image (the *source manifest* before it is written to Parquet):

================  =====================================================================
column            meaning
================  =====================================================================
image_id          unique, stable id ``<category>/<defect_type>/<stem>`` (see layouts)
category          product / surface name (``bottle``, ``magnetic-tile``, ...)
defect_type       defect class, ``"good"`` for a defect-free image
image_path        POSIX path of the image, relative to ``root``
mask_path         POSIX path of the mask relative to ``root``; ``None`` for good images
width, height     image size in pixels (ints)
image_sha256      SHA-256 of the image file's bytes
mask_sha256       SHA-256 of the mask file's bytes; ``None`` for good images
mask_area         defect pixels after thresholding the mask (``>= mask_threshold``); 0 for good
origin            ``"train"`` / ``"test"`` as the source dataset labels the image (MVTec AD's
                  own split), ``"unspecified"`` where the layout has no split
================  =====================================================================

Every image and every mask is decoded in full before anything is returned, in one pass
over all files: a corrupt file, a mask of the wrong size, an empty or missing mask is a
*bad sample*. With ``on_bad="fail"`` (the default) ingestion stops after the pass with a
:class:`BadSamplesError` whose first line says how many files are bad and names the
first ones (``.bad`` holds them all); with ``on_bad="skip"`` the bad samples are left out
of the table and returned in ``df.attrs["bad"]`` (see :class:`BadSample`).

Paths are confined: every image and mask must resolve (symlinks followed) inside the
real path of ``root``; a symlinked file or class folder pointing outside stops ingestion
whatever ``on_bad`` says. ``image_glob`` must be relative and may not contain ``..``.

Layouts
-------
``mvtec`` (MVTec AD)::

    <root>/<category>/train/good/<id>.png
    <root>/<category>/test/<defect_type>/<id>.png          (test/good too)
    <root>/<category>/ground_truth/<defect_type>/<id>_mask.png

``root`` may also be a single category folder (one holding ``train/`` and ``test/``);
the category is then the folder's name. Ids: ``bottle/good/train-000``,
``bottle/good/test-000`` (train and test goods stay distinct), ``bottle/broken_large/000``
(a defect image found under ``train/`` would get ``train-000``). ``mask_rule`` is not used:
MVTec AD's masks are always ``ground_truth/<defect_type>/<stem>_mask.png``.

``folder`` (generic)::

    <root>/<category>/<defect_type>/<images matching image_glob>

A folder named ``good`` holds defect-free images (no mask needed). Every other image
needs a mask found by ``mask_rule``: a pattern for the mask's path *relative to the folder
the image is in*, with the fields ``{stem}`` (file name without suffix), ``{name}`` (file
name), ``{suffix}`` (``.png``), ``{category}`` and ``{defect_type}``, each replaced by its
text as is (``{{`` / ``}}`` are literal braces; attributes, indexes, conversions and format
specs such as ``{stem.x}`` or ``{stem:>9}`` are refused). Examples:

* ``"{stem}_mask.png"`` (default): ``crack/001.png`` + ``crack/001_mask.png`` side by side;
* ``"../masks/{stem}.png"`` with ``image_glob="images/*"``: ``crack/images/001.jpg`` +
  ``crack/masks/001.png``;
* ``"{stem}.png"`` with ``image_glob="*.jpg"``: ``crack/001.jpg`` + ``crack/001.png``.

Files that are the mask of another image are never taken as images themselves. If
``root`` itself holds a ``good`` folder it is read as a single category named after
``root``. ``origin`` is ``"unspecified"``. Ids: ``<category>/<defect_type>/<stem>``.

``magnetic-tile`` (Huang et al., "Surface defect saliency of magnetic tile")::

    <root>/MT_<Class>/Imgs/<id>.jpg   with the mask <id>.png beside it

``MT_Free`` is defect-free (``defect_type="good"``, its all-black masks are not read);
other classes give ``defect_type=<class>.lower()`` (``blowhole``, ``break``, ``crack``,
``fray``, ``uneven``). Category ``magnetic-tile``. Its masks are not clean 0/255 (values
1..254 occur at the edges), hence the threshold. ``image_glob`` filters the ``.jpg``/``.jpeg``
files of each ``Imgs`` folder.

Example
-------
>>> from defectforge.data.adapters import ingest
>>> df = ingest("magnetic-tile", "../shared/data/magnetic-tile")  # doctest: +SKIP
>>> df.groupby("defect_type").size().to_dict()                     # doctest: +SKIP
{'blowhole': 115, 'break': 85, 'crack': 57, 'good': 476}
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from defectforge.data.codec import IMAGE_SUFFIXES, _decode, too_large_message
from defectforge.errors import DataError, ParamsError
from defectforge.params.data import image_glob_problem, mask_rule_parts as _mask_rule_parts

LAYOUTS = ("mvtec", "folder", "magnetic-tile")
ON_BAD = ("fail", "skip")
GOOD = "good"
COLUMNS = [
    "image_id",
    "category",
    "defect_type",
    "image_path",
    "mask_path",
    "width",
    "height",
    "image_sha256",
    "mask_sha256",
    "mask_area",
    "origin",
]
_EXPECTED = {
    "mvtec": "<category>/train/good/*.png and <category>/test/<defect_type>/*.png",
    "folder": "<category>/<defect_type>/<image>",
    "magnetic-tile": "MT_<Class>/Imgs/<id>.jpg",
}
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class BadSample:
    """One sample left out (or stopping ingestion): which file, and why.

    ``reason`` is one of :data:`REASONS`; ``detail`` is the one-line message naming the file.
    Paths are POSIX, relative to the dataset root.
    """

    image_id: str
    category: str
    defect_type: str
    image_path: str
    mask_path: str | None
    reason: str
    detail: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


REASONS = ("unreadable image", "image has no pixels", "image too large", "not a regular file", "missing mask",
           "unreadable mask", "size mismatch", "empty mask")


class BadSamplesError(DataError):
    """Bad samples found with ``on_bad="fail"``: the message is one summary line, ``bad`` has them all."""

    def __init__(self, message: str, bad: list[BadSample]):
        super().__init__(message)
        self.bad = bad
        self.details = [b.detail for b in bad]


class _Bad(Exception):
    """Raised inside :func:`_read_entry`; collected, never seen by callers."""

    def __init__(self, reason: str, detail: str, mask: Path | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.mask = reason, detail, mask


@dataclass(frozen=True)
class _Entry:
    """One image found on disk, before its files are read."""

    image_id: str
    category: str
    defect_type: str
    image: Path
    mask: Path | None  # None only for good images
    origin: str


# --------------------------------------------------------------------------- public


def ingest(
    layout: str,
    root: str | os.PathLike,
    *,
    image_glob: str = "*",
    mask_rule: str = "{stem}_mask.png",
    mask_threshold: int = 128,
    on_bad: str = "fail",
    progress: bool = False,
) -> pd.DataFrame:
    """Read a dataset folder into the canonical source table (see the module docstring).

    Args:
        layout: ``"mvtec"``, ``"folder"`` or ``"magnetic-tile"``.
        root: the dataset folder; every path in the result is relative to it.
        image_glob: glob for image files inside each leaf folder (only files with an
            image suffix are taken).
        mask_rule: ``folder`` layout only: the mask's path relative to its image's folder.
        mask_threshold: a mask pixel is defect where its gray value is ``>=`` this.
        on_bad: ``"fail"``: bad samples stop ingestion (all of them reported at once);
            ``"skip"``: they are left out and listed in ``df.attrs["bad"]``.
        progress: show a progress bar on stderr (closed before any error is raised).

    Returns:
        One row per image, sorted by ``image_id``, columns :data:`COLUMNS`;
        ``df.attrs["bad"]``: the :class:`BadSample` list (sorted by id), ``df.attrs["checked"]``:
        how many images were read.

    Raises:
        BadSamplesError: with ``on_bad="fail"``, a corrupt image or mask, a mask of another
            size than its image, an empty or missing mask (every one found, the first
            line says how many).
        DataError: unknown layout, missing root, no images, a path escaping the root,
            every sample bad; the message names the file.
        ParamsError: a bad ``mask_threshold``, ``image_glob``, ``mask_rule`` or ``on_bad``.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown layout {layout!r}; allowed layouts: {', '.join(LAYOUTS)}")
    is_int = isinstance(mask_threshold, (int, np.integer)) and not isinstance(mask_threshold, bool)
    if not is_int or not 1 <= mask_threshold <= 255:
        raise ParamsError(f"mask_threshold={mask_threshold!r}: must be an integer in 1..255")
    if on_bad not in ON_BAD:
        raise ParamsError(f"on_bad={on_bad!r}: allowed: {' or '.join(map(repr, ON_BAD))}")
    check_image_glob(image_glob)
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: dataset root not found")
    if not root.is_dir():
        raise DataError(f"{root}: dataset root is not a folder")

    finder = {"mvtec": _find_mvtec, "folder": _find_folder, "magnetic-tile": _find_magnetic_tile}[layout]
    entries = finder(root, image_glob=image_glob, mask_rule=mask_rule)
    if not entries:
        raise DataError(
            f"{root}: no images found for layout {layout!r} "
            f"(expected {_EXPECTED[layout]}, image_glob={image_glob!r})"
        )
    _check_printable_ids(entries)
    _check_confined(root, entries)
    _check_unique_ids(entries)

    rows, bad = [], []
    with _progress(entries, progress, f"ingest {layout}") as items:
        for e in items:
            try:
                rows.append(_read_entry(root, e, mask_threshold))
            except _Bad as b:
                bad.append(BadSample(e.image_id, e.category, e.defect_type, _relative(root, e.image),
                                     None if b.mask is None else _relative(root, b.mask), b.reason, b.detail))
    bad.sort(key=lambda b: b.image_id)
    if bad and (on_bad == "fail" or not rows):
        what = "every sample is bad" if not rows else "nothing read"
        raise BadSamplesError(
            f"{root}: {len(bad)} of {len(entries)} samples are bad ({summarize(bad)}); {what}; first: {bad[0].detail}", bad)
    df = pd.DataFrame(rows, columns=COLUMNS)
    df = df.sort_values("image_id", kind="stable").reset_index(drop=True)
    df["width"] = df["width"].astype("int64")
    df["height"] = df["height"].astype("int64")
    df["mask_area"] = df["mask_area"].astype("int64")
    for col in ("mask_path", "mask_sha256"):  # None (not NaN) where a good image has no mask
        df[col] = pd.Series([v if isinstance(v, str) else None for v in df[col]], dtype=object)
    df.attrs["bad"] = bad
    df.attrs["checked"] = len(entries)
    return df


def summarize(bad: list[BadSample]) -> str:
    """``"3 empty mask, 1 missing mask"``: counts by reason, most frequent first."""
    counts: dict[str, int] = {}
    for b in bad:
        counts[b.reason] = counts.get(b.reason, 0) + 1
    return ", ".join(f"{n} {r}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_image_glob(image_glob: str) -> None:
    """``image_glob`` is matched inside each class folder: it must be relative, without ``..``."""
    problem = image_glob_problem(image_glob) if isinstance(image_glob, str) else "must be a string"
    if problem:
        raise ParamsError(f"image_glob={image_glob!r}: {problem}")


# --------------------------------------------------------------------------- layouts


def _find_mvtec(root: Path, *, image_glob: str, mask_rule: str) -> list[_Entry]:
    del mask_rule  # MVTec AD's mask naming is fixed
    single = (root / "train").is_dir() or (root / "test").is_dir()
    category_dirs = [root] if single else _subdirs(root)
    entries: list[_Entry] = []
    for cat_dir in category_dirs:
        category = cat_dir.name
        for origin in ("train", "test"):
            for defect_dir in _subdirs(cat_dir / origin):
                defect_type = defect_dir.name
                for image in _images(defect_dir, image_glob):
                    if defect_type == GOOD:
                        image_id, mask = f"{category}/{GOOD}/{origin}-{image.stem}", None
                    else:
                        prefix = "train-" if origin == "train" else ""
                        image_id = f"{category}/{defect_type}/{prefix}{image.stem}"
                        mask = cat_dir / "ground_truth" / defect_type / f"{image.stem}_mask.png"
                    entries.append(_Entry(image_id, category, defect_type, image, mask, origin))
    return entries


def _find_folder(root: Path, *, image_glob: str, mask_rule: str) -> list[_Entry]:
    _check_mask_rule(mask_rule)
    category_dirs = [root] if (root / GOOD).is_dir() else _subdirs(root)
    entries: list[_Entry] = []
    for cat_dir in category_dirs:
        category = cat_dir.name
        for defect_dir in _subdirs(cat_dir):
            defect_type = defect_dir.name
            candidates = _images(defect_dir, image_glob)

            def mask_of(image: Path) -> Path:
                rel = _apply_mask_rule(
                    mask_rule, stem=image.stem, name=image.name, suffix=image.suffix, category=category, defect_type=defect_type
                )
                return Path(os.path.normpath(image.parent / rel))

            masks = {}
            for image in candidates:
                m = mask_of(image)
                if m == Path(os.path.normpath(image)):
                    raise DataError(f"{image}: mask_rule {mask_rule!r} maps this image onto itself")
                masks[image] = m
            taken_as_mask = {os.path.normpath(m) for m in masks.values()}
            for image in candidates:
                if os.path.normpath(image) in taken_as_mask:
                    continue  # the mask of another image, not an image
                mask = None if defect_type == GOOD else masks[image]
                entries.append(
                    _Entry(f"{category}/{defect_type}/{image.stem}", category, defect_type, image, mask, "unspecified")
                )
    return entries


def _find_magnetic_tile(root: Path, *, image_glob: str, mask_rule: str) -> list[_Entry]:
    del mask_rule  # the dataset's rule is fixed: <id>.png beside <id>.jpg
    entries: list[_Entry] = []
    for class_dir in _subdirs(root):
        if not class_dir.name.startswith("MT_"):
            continue
        name = class_dir.name[len("MT_"):].lower()
        defect_type = GOOD if name == "free" else name
        for image in _images(class_dir / "Imgs", image_glob, suffixes=(".jpg", ".jpeg")):
            mask = None if defect_type == GOOD else image.with_suffix(".png")
            image_id = f"magnetic-tile/{defect_type}/{image.stem}"
            entries.append(_Entry(image_id, "magnetic-tile", defect_type, image, mask, "unspecified"))
    return entries


# --------------------------------------------------------------------------- reading


def _read_entry(root: Path, e: _Entry, threshold: int) -> dict:
    """One row, or :class:`_Bad` naming the file and the reason."""
    if not e.image.is_file():  # a FIFO, a device or a link to one: never opened (reading it may block)
        raise _Bad("not a regular file", f"{e.image}: {_what_is(e.image)}, not an image file")
    data = _read_bytes(e.image, "image")
    width, height = _decode_size(e.image, data)
    row = {
        "image_id": e.image_id,
        "category": e.category,
        "defect_type": e.defect_type,
        "image_path": _relative(root, e.image),
        "mask_path": None,
        "width": width,
        "height": height,
        "image_sha256": hashlib.sha256(data).hexdigest(),
        "mask_sha256": None,
        "mask_area": 0,
        "origin": e.origin,
    }
    if e.mask is None:
        return row
    if not e.mask.is_file():
        if os.path.lexists(e.mask):  # something of that name is there, but no file to read
            raise _Bad("not a regular file",
                       f"{e.mask}: {_what_is(e.mask)}, not a mask file (the mask of defect image {e.image})", e.mask)
        raise _Bad("missing mask", f"{e.image}: no mask for this defect image (expected {e.mask})", e.mask)
    mdata = _read_bytes(e.mask, "mask")
    mask = _decode_mask(e.mask, mdata, threshold)
    if mask.shape != (height, width):
        raise _Bad("size mismatch",
                   f"{e.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {e.image} is {width}x{height}", e.mask)
    area = int(np.count_nonzero(mask))
    if area == 0:
        raise _Bad("empty mask", f"{e.mask}: empty mask (no pixel >= {threshold}) for defect image {e.image}", e.mask)
    row.update(mask_path=_relative(root, e.mask), mask_sha256=hashlib.sha256(mdata).hexdigest(), mask_area=area)
    return row


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _Bad(f"unreadable {what}", f"{path}: cannot read {what} ({exc.strerror or exc.__class__.__name__})",
                   path if what == "mask" else None) from None


def _decode_size(path: Path, data: bytes) -> tuple[int, int]:
    """Decode the whole image (catches truncated files) and return (width, height)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                width, height = im.size
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise _Bad("image too large", too_large_message(path, "image", exc)) from None
    except _DECODE_ERRORS as exc:
        raise _Bad("unreadable image", f"{path}: unreadable or corrupt image ({exc.__class__.__name__})") from None
    if width == 0 or height == 0:
        raise _Bad("image has no pixels", f"{path}: image has no pixels")
    return width, height


def _decode_mask(path: Path, data: bytes, threshold: int) -> np.ndarray:
    """The mask at its real bit depth (16-bit masks scaled to 8 bits), thresholded."""
    try:
        return _decode(path, "L", "mask", data=data) >= threshold
    except DataError as exc:
        raise _Bad("unreadable mask", str(exc), path) from None


# --------------------------------------------------------------------------- helpers


def _check_confined(root: Path, entries: list[_Entry]) -> None:
    """Every image and mask must resolve (symlinks followed) inside the real dataset root.

    A path that exists but is not a regular file (a link to a device, a FIFO) is never
    opened: it is reported as a bad sample instead (see :func:`_read_entry`)."""
    real_root = root.resolve()
    escaping = []
    for e in entries:
        for path in (e.image, e.mask):
            if path is None or (path.exists() and not path.is_file()):
                continue
            real = path.resolve()
            if real != real_root and real_root not in real.parents:
                escaping.append((path, real))
    if escaping:
        path, real = escaping[0]
        via = f" through a symlink (to {real})" if Path(os.path.abspath(path)) != real else ""
        more = f"; {len(escaping) - 1} more file(s) escape too" if len(escaping) > 1 else ""
        raise DataError(f"{path}: path escapes the dataset root {real_root}{via}; refusing to ingest it{more}")


def _what_is(path: Path) -> str:
    """``"a FIFO"``, ``"a link to a character device (/dev/null)"``, ...: what is at ``path``."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError:
        return f"a broken link (to {os.readlink(path)})" if path.is_symlink() else "not readable"
    kinds = [(stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file")]
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"a link to {kind} ({path.resolve()})" if path.is_symlink() else kind


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path, pattern: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[Path]:
    if not folder.is_dir():
        return []
    # anything named like an image except a folder: a FIFO, a link to a device or a broken link
    # becomes a bad sample naming what is there (see _read_entry), never a silent drop
    return sorted(
        p for p in folder.glob(pattern)
        if not p.is_dir() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )


def _relative(root: Path, path: Path) -> str:
    rel = Path(os.path.relpath(path, root)).as_posix()
    if rel == ".." or rel.startswith("../"):
        raise DataError(f"{path}: path escapes the dataset root {root}")
    return rel


def _apply_mask_rule(rule: str, **values: str) -> str:
    """``rule`` with each documented field replaced by its value's text (nothing else is evaluated)."""
    return "".join(literal + (str(values[field]) if field is not None else "") for literal, field in _mask_rule_parts(rule))


def _check_mask_rule(rule: str) -> None:
    _mask_rule_parts(rule)


def _check_printable_ids(entries: list[_Entry]) -> None:
    """An id (from folder and file names) with a control character (a newline, a tab, ...) would
    break every line-oriented report and listing that shows it: refused, naming the file."""
    bad = [e for e in entries if any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in e.image_id)]
    if bad:
        more = f"; {len(bad) - 1} more such file(s)" if len(bad) > 1 else ""
        raise DataError(f"{str(bad[0].image)!r}: image id {bad[0].image_id!r} holds a control character "
                        f"(newline, tab, ...); rename the file or folder{more}")


def _check_unique_ids(entries: list[_Entry]) -> None:
    seen: dict[str, Path] = {}
    for e in entries:
        if e.image_id in seen:
            raise DataError(f"{e.image}: image id {e.image_id!r} already used by {seen[e.image_id]} (same file stem)")
        seen[e.image_id] = e.image


@contextmanager
def _progress(items, enabled: bool, desc: str):
    """Iterate ``items``, with a bar on stderr when enabled; the bar's line is always ended
    (also on an exception) so an error message starts on a line of its own."""
    if not enabled:
        yield items
        return
    from tqdm import tqdm

    bar = tqdm(items, desc=desc, unit="img", file=sys.stderr)
    try:
        yield bar
    finally:
        bar.close()  # leave=True: redraws the bar and ends its line

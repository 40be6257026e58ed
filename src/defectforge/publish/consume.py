"""The consumer side: read a released dataset version as a table or a torch Dataset.

    import defectforge
    table = defectforge.load("data/release/manifest.parquet", filters={"defect_type": "crack"})
    table = defectforge.load(name="sample", version=3, repo="https://git.example.com/factory.git")
    table = defectforge.load(name="sample", version=3, repo=URL, remote="s3://bucket/dvc")  # remote not in the tag's config
    ds = defectforge.ManifestDataset(table)   # (image, mask, row) items

Filters (``{"defect_type": "crack", "method": ["inversion"], "qc_pass": True}``) are
pushed down to Parquet: only matching row groups are read.

Reads are verified: each image and mask a :class:`ManifestDataset` item reads is hashed as its
bytes come in (one pass, no second read) and checked against the row's ``image_sha256`` /
``mask_sha256``; a file changed after release fails the item with one line naming the row
and the file. ``verify=False`` (on :func:`load` or :class:`ManifestDataset`) turns it off.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import posixpath
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.manifest.schema import META_ROOT
from defectforge.manifest.paths import inside, project_of
from defectforge.publish.versions import tag_name

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]*$"  # the release-name pattern of params release.name


def _release_path(name: str, version: int) -> str:
    return f"releases/{name}/v{version}/manifest.parquet"


def _check_name_version(name: Any, version: Any) -> int:
    """``name`` matches the release-name pattern and ``version`` is a positive int (``3``, ``"3"``, ``"v3"``)."""
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise DefectforgeError(f"load: name={name!r} is not a release name (lower-case letters, digits, '_' and '-', e.g. 'sample')")
    v = version
    if isinstance(v, str) and re.fullmatch(r"v?[0-9]+", v):
        v = int(v.lstrip("v"))
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise DefectforgeError(f"load: version={version!r} is not a positive integer version (1, 2, ... or 'v1')")
    return v


# the confinement checks are shared with ``defectforge validate`` / ``verify`` (one copy)
_inside = inside
_project_of = project_of


def _confined_root(manifest: Path, within: Path) -> str:
    """The manifest's dataset root, refused when absolute or outside ``within`` (symlinks resolved)."""
    import pyarrow.parquet as pq

    from defectforge.manifest.io import shard_files

    files = [manifest] if manifest.is_file() else shard_files(manifest)
    stored = ((pq.read_schema(files[0]).metadata or {}).get(META_ROOT, b".") if files else b".").decode()
    if os.path.isabs(stored) or (len(stored) > 1 and stored[1] == ":"):
        raise DefectforgeError(f"{manifest}: dataset_root metadata {stored!r} is absolute; a manifest's root must be relative to its own folder")
    root = manifest_info(manifest)["dataset_root"]
    if not _inside(root, within):
        raise DefectforgeError(f"{manifest}: dataset_root metadata {stored!r} resolves to {os.path.realpath(root)}, "
                               f"outside {os.path.realpath(within)}; refusing to read files there")
    return os.path.realpath(root)


def load(
    path: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    version: int | str | None = None,
    repo: str | None = None,
    filters: dict[str, Any] | None = None,
    columns: list[str] | None = None,
    within: str | os.PathLike | None = None,
    verify: bool = True,
    remote: str | None = None,
) -> pa.Table:
    """The manifest of a dataset version as a pyarrow Table (``.to_pandas()`` for pandas).

    Either a local ``path`` (manifest file or folder), or ``name`` + ``version`` of a
    published release, read from the working copy ``repo`` (default: current
    directory) or, for a remote git URL, through ``dvc.api`` at the tag
    ``dataset/<name>/v<version>``. The table's metadata keeps the dataset root; for a
    remote read it records ``repo`` and ``rev`` so :class:`ManifestDataset` can fetch files.

    Reads are confined: the dataset root stored in the manifest (relative to the
    manifest's folder) must resolve, symlinks followed, inside ``within`` - by default
    the repository for ``name``/``version`` and, for a ``path``, the project holding the
    manifest (nearest folder up with ``.git``, ``.dvc`` or ``dvc.yaml``; else the
    manifest's own folder). An absolute or escaping root is refused.

    ``remote`` (remote reads only): where the version's data is, when the tag's committed
    ``.dvc/config`` does not say (a factory whose remote is private): a URL or absolute path
    of the DVC remote, or the name of a remote the repository's config defines. It is
    recorded in the table, so :class:`ManifestDataset` fetches the files from there too.

    ``verify`` (default True) is recorded in the table: a :class:`ManifestDataset` made from
    it checks every file it reads against the row's hash unless told otherwise.
    """
    if path is not None:
        path = Path(path)
        base = Path(within) if within is not None else _project_of(path)
        if not _inside(path, base):
            raise DefectforgeError(f"load: {path} is outside {os.path.realpath(base)}")
        root = _confined_root(path, base)
        table = read_manifest(path, filters=filters, columns=columns)
        return _with_origin(table, root=root, verify=verify)
    if name is None or version is None:
        raise DefectforgeError("load: give a manifest path, or name= and version= of a published release")
    v = _check_name_version(name, version)
    rel = _release_path(name, v)
    local = Path(repo or ".") / rel
    if (repo is None or Path(repo).is_dir()) and local.is_file():
        base = Path(repo or ".")
        if not _inside(local, base / "releases"):
            raise DefectforgeError(f"load: {local} resolves outside {os.path.realpath(base / 'releases')}; refusing to read it")
        return load(local, filters=filters, columns=columns, within=base, verify=verify)
    import dvc.api

    rev = tag_name(name, v)
    if remote and not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", remote) and ("/" in remote or os.sep in remote or remote.startswith(".")):
        remote = os.path.abspath(remote)  # a path, relative to where load is called, recorded absolute
    try:
        data = dvc.api.read(rel, repo=repo, rev=rev, mode="rb", **_remote_kwargs(remote))
    except Exception as exc:  # noqa: BLE001 - dvc raises many kinds; one line for the user
        raise DefectforgeError(f"load: cannot read {rel} at {rev} from {repo}: {exc.__class__.__name__}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "manifest.parquet"
        f.write_bytes(data)
        table = read_manifest(f, filters=filters, columns=columns)
        import pyarrow.parquet as pq

        stored = (pq.read_schema(f).metadata or {}).get(META_ROOT, b".").decode()
    # The manifest's root is relative to releases/<name>/v<N>/ inside the repo; it must stay in the repo.
    if os.path.isabs(stored):
        raise DefectforgeError(f"load: {rel} at {rev}: dataset_root metadata {stored!r} is absolute; refusing to read files there")
    root_in_repo = posixpath.normpath(posixpath.join(posixpath.dirname(rel), stored.replace("\\", "/")))
    if root_in_repo == ".." or root_in_repo.startswith("../") or posixpath.isabs(root_in_repo):
        raise DefectforgeError(f"load: {rel} at {rev}: dataset_root metadata {stored!r} escapes the repository; refusing to read files there")
    return _with_origin(table, root=root_in_repo, repo=repo, rev=rev, verify=verify, remote=remote)


REMOTE_NAME = "defectforge-consumer"  # the name given to a remote passed as a URL


def _remote_kwargs(remote: str | None) -> dict[str, Any]:
    """dvc.api / DVCFileSystem arguments for ``remote``: a name as is; a URL or path as the default
    remote (merged over whatever the tag's config says)."""
    if not remote:
        return {}
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", remote):
        url = remote
    elif os.sep in remote or "/" in remote or remote.startswith("."):
        url = os.path.abspath(remote)  # a path, relative to the consumer's working directory
    else:
        return {"remote": remote}
    return {"config": {"core": {"remote": REMOTE_NAME}, "remote": {REMOTE_NAME: {"url": url}}}}


def _with_origin(table: pa.Table, *, root: str, repo: str | None = None, rev: str | None = None, verify: bool = True,
                 remote: str | None = None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[b"defectforge.load.root"] = str(root).encode()
    meta[b"defectforge.load.verify"] = b"1" if verify else b"0"
    if repo is not None:
        meta[b"defectforge.load.repo"] = repo.encode()
        meta[b"defectforge.load.rev"] = (rev or "").encode()
        if remote:
            meta[b"defectforge.load.remote"] = remote.encode()
    return table.replace_schema_metadata(meta)


def _collatable(value: Any, typ: pa.DataType) -> Any:
    """``value`` as torch's default collate takes it: no None, no ragged lists."""
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        return "; ".join(str(v) for v in (value or []))
    if value is not None:
        return value
    if pa.types.is_floating(typ):
        return float("nan")
    if pa.types.is_integer(typ):
        return -1
    if pa.types.is_boolean(typ):
        return False
    return ""


class ManifestDataset:
    """A torch-style Dataset over a loaded manifest: item = (image float CHW in [0,1], mask 1HW, row dict).

    Works as a ``torch.utils.data.Dataset`` (it has ``__len__``/``__getitem__``) and
    returns torch tensors; ``transform(image, mask)`` runs on the tensors.

    Rows are ready for ``torch.utils.data.DataLoader``'s default collate: a missing
    value becomes a typed default (text ``""``, float ``nan``, integer ``-1``, boolean
    ``False`` - e.g. ``qc_pass`` of a release made without the quality stage) and a
    list column (``qc_reasons``) one ``"; "``-joined string. ``raw_rows=True`` gives the
    rows as stored (with ``None`` and lists; then pass your own ``collate_fn``).
    """

    def __init__(
        self,
        table: pa.Table,
        transform: Callable | None = None,
        opener: Callable[[str], bytes] | None = None,
        root: str | os.PathLike | None = None,
        raw_rows: bool = False,
        verify: bool | None = None,
    ):
        """``table`` from :func:`load` (it records the dataset root); any other table needs ``root=``.

        ``verify`` (default: what :func:`load` was told, else True): every image and mask an
        item reads is hashed as it is read and must match the row's ``image_sha256`` /
        ``mask_sha256`` (a row without that hash, e.g. a hand-built table, is read as is);
        a mismatch raises :class:`DefectforgeError` naming the row and the file.

        Every file read stays inside the root: a row path that is absolute, climbs out
        with ``..`` or leads out through a symlink raises :class:`DefectforgeError`.
        """
        self.rows = table.to_pylist()
        if not raw_rows:
            types = {f.name: f.type for f in table.schema}
            self.rows = [{k: _collatable(v, types[k]) for k, v in r.items()} for r in self.rows]
        meta = table.schema.metadata or {}
        if root is None and b"defectforge.load.root" not in meta:
            raise DefectforgeError("ManifestDataset: the table does not come from defectforge.load (no dataset root recorded); "
                                   "pass root= the folder its paths are relative to")
        self.root = str(root) if root is not None else meta[b"defectforge.load.root"].decode()
        self.repo = None if root is not None else (meta.get(b"defectforge.load.repo", b"").decode() or None)
        self.rev = meta.get(b"defectforge.load.rev", b"").decode() or None
        self.remote = meta.get(b"defectforge.load.remote", b"").decode() or None
        self.verify = verify if verify is not None else meta.get(b"defectforge.load.verify", b"1") != b"0"
        self.transform = transform
        self._opener = opener
        self._fs = None  # one DVCFileSystem per process for remote reads (not pickled to DataLoader workers)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fs"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def _full(self, relpath: str) -> str:
        """``root/relpath``, refused unless it stays inside the root (symlinks resolved for local reads)."""
        p = str(relpath).replace("\\", "/")
        norm = posixpath.normpath(p)
        if not p or p.startswith("/") or (len(p) > 1 and p[1] == ":") or norm == ".." or norm.startswith("../"):
            raise DefectforgeError(f"ManifestDataset: path {relpath!r} escapes the dataset root {self.root}")
        full = os.path.join(self.root, norm)
        if self.repo is None and self._opener is None and not _inside(full, self.root):
            raise DefectforgeError(f"ManifestDataset: {full} resolves to {os.path.realpath(full)}, outside the dataset root {os.path.realpath(self.root)}")
        return full

    def read_bytes(self, relpath: str) -> bytes:
        """The bytes of the file at ``relpath`` (a row's ``image_path``, ``mask_path``, ...), confined to the root."""
        return self._read(relpath)

    def _read(self, relpath: str, hasher=None) -> bytes:
        """The file's bytes; ``hasher`` (a hashlib object) is fed the same bytes as they are read."""
        full = self._full(relpath)
        if self._opener is not None:
            data = self._opener(full)
            if hasher is not None:
                hasher.update(data)
            return data
        if self.repo is None:
            mode = os.stat(full).st_mode if os.path.exists(full) else None
            if mode is not None and not stat.S_ISREG(mode):  # a fifo would block the read, a device feed it forever
                raise DefectforgeError(f"ManifestDataset: {full}: not a regular file (a fifo, device, socket or folder); refusing to read it")
            if hasher is None:
                return Path(os.path.realpath(full)).read_bytes()
            buf = bytearray()
            with open(os.path.realpath(full), "rb") as f:
                while chunk := f.read(1 << 20):
                    hasher.update(chunk)
                    buf += chunk
            return bytes(buf)
        if self._fs is None:
            from dvc.api import DVCFileSystem

            self._fs = DVCFileSystem(self.repo, rev=self.rev, **_remote_kwargs(self.remote))
        path = "/" + posixpath.normpath(full).lstrip("/")
        try:
            data = self._fs.read_bytes(path)
        except Exception as exc:  # noqa: BLE001 - dvc raises many kinds; one line for the user
            raise DefectforgeError(f"ManifestDataset: cannot read {path} at {self.rev} from {self.repo}: "
                                   f"{exc.__class__.__name__}: {exc}") from None
        if hasher is not None:
            hasher.update(data)
        return data

    def _read_checked(self, row: dict, path_col: str, sha_col: str) -> bytes:
        """The bytes of ``row[path_col]``, hashed while read and checked against ``row[sha_col]`` when verifying."""
        expected = row.get(sha_col) if self.verify else None
        if not isinstance(expected, str) or not expected:
            return self._read(row[path_col])
        h = hashlib.sha256()
        data = self._read(row[path_col], h)
        if h.hexdigest() != expected:
            rid = row.get("sample_id") or row.get("image_id") or "?"
            raise DefectforgeError(f"ManifestDataset: row {rid}: {os.path.join(self.root, row[path_col])}: {sha_col} {expected[:12]}... "
                                   f"does not match the file's bytes ({h.hexdigest()[:12]}...); the file changed after release - "
                                   "fetch the version again (defectforge verify DIR checks a copy), or pass verify=False to read it as is")
        return data

    def __getitem__(self, i: int):
        try:
            import torch
        except ImportError:
            raise DefectforgeError("ManifestDataset items are torch tensors: pip install 'defectforge[dataset]' (or read "
                                   "the files with read_bytes)") from None

        row = self.rows[i]
        img = np.asarray(Image.open(io.BytesIO(self._read_checked(row, "image_path", "image_sha256"))).convert("RGB"))
        mask = np.asarray(Image.open(io.BytesIO(self._read_checked(row, "mask_path", "mask_sha256"))).convert("L")) >= 128
        image_t = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
        mask_t = torch.from_numpy(mask.copy())[None].float()
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return image_t, mask_t, dict(row)

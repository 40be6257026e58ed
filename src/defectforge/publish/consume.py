"""The consumer side: read a released dataset version as a table or a torch Dataset.

    import defectforge
    table = defectforge.load("data/release/manifest.parquet", filters={"defect_type": "crack"})
    table = defectforge.load(name="sample", version=3, repo="https://git.example.com/factory.git")
    ds = defectforge.ManifestDataset(table)   # (image, mask, row) items

Filters (``{"defect_type": "crack", "method": ["inversion"], "qc_pass": True}``) are
pushed down to Parquet: only matching row groups are read.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.publish.versions import tag_name


def _release_path(name: str, version: int) -> str:
    return f"releases/{name}/v{version}/manifest.parquet"


def load(
    path: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    version: int | str | None = None,
    repo: str | None = None,
    filters: dict[str, Any] | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The manifest of a dataset version as a pyarrow Table (``.to_pandas()`` for pandas).

    Either a local ``path`` (manifest file or folder), or ``name`` + ``version`` of a
    published release, read from the working copy ``repo`` (default: current
    directory) or, for a remote git URL, through ``dvc.api`` at the tag
    ``dataset/<name>/v<version>``. The table's metadata keeps the dataset root; for a
    remote read it records ``repo`` and ``rev`` so :class:`ManifestDataset` can fetch files.
    """
    if path is not None:
        table = read_manifest(path, filters=filters, columns=columns)
        return _with_origin(table, root=manifest_info(path)["dataset_root"])
    if name is None or version is None:
        raise DefectforgeError("load: give a manifest path, or name= and version= of a published release")
    v = int(str(version).lstrip("v"))
    rel = _release_path(name, v)
    local = Path(repo or ".") / rel
    if (repo is None or Path(repo).is_dir()) and local.is_file():
        return load(local, filters=filters, columns=columns)
    import dvc.api

    rev = tag_name(name, v)
    try:
        data = dvc.api.read(rel, repo=repo, rev=rev, mode="rb")
    except Exception as exc:  # noqa: BLE001 - dvc raises many kinds; one line for the user
        raise DefectforgeError(f"load: cannot read {rel} at {rev} from {repo}: {exc.__class__.__name__}: {exc}") from None
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "manifest.parquet"
        f.write_bytes(data)
        table = read_manifest(f, filters=filters, columns=columns)
        info = manifest_info(f)
    # The manifest's root is relative to releases/<name>/v<N>/ inside the repo.
    root_in_repo = os.path.normpath(os.path.join(os.path.dirname(rel), os.path.relpath(info["dataset_root"], tmp)))
    return _with_origin(table, root=root_in_repo, repo=repo, rev=rev)


def _with_origin(table: pa.Table, *, root: str, repo: str | None = None, rev: str | None = None) -> pa.Table:
    meta = dict(table.schema.metadata or {})
    meta[b"defectforge.load.root"] = str(root).encode()
    if repo is not None:
        meta[b"defectforge.load.repo"] = repo.encode()
        meta[b"defectforge.load.rev"] = (rev or "").encode()
    return table.replace_schema_metadata(meta)


class ManifestDataset:
    """A torch-style Dataset over a loaded manifest: item = (image float CHW in [0,1], mask 1HW, row dict).

    Works as a ``torch.utils.data.Dataset`` (it has ``__len__``/``__getitem__``) and
    returns torch tensors; ``transform(image, mask)`` runs on the tensors.
    """

    def __init__(self, table: pa.Table, transform: Callable | None = None, opener: Callable[[str], bytes] | None = None):
        self.rows = table.to_pylist()
        meta = table.schema.metadata or {}
        self.root = meta.get(b"defectforge.load.root", b".").decode()
        self.repo = meta.get(b"defectforge.load.repo", b"").decode() or None
        self.rev = meta.get(b"defectforge.load.rev", b"").decode() or None
        self.transform = transform
        self._opener = opener

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, relpath: str) -> bytes:
        full = os.path.join(self.root, relpath)
        if self._opener is not None:
            return self._opener(full)
        if self.repo is None:
            return Path(full).read_bytes()
        import dvc.api

        return dvc.api.read(os.path.normpath(full), repo=self.repo, rev=self.rev, mode="rb")

    def __getitem__(self, i: int):
        import torch

        row = self.rows[i]
        img = np.asarray(Image.open(io.BytesIO(self._read(row["image_path"]))).convert("RGB"))
        mask = np.asarray(Image.open(io.BytesIO(self._read(row["mask_path"]))).convert("L")) >= 128
        image_t = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255.0
        mask_t = torch.from_numpy(mask.copy())[None].float()
        if self.transform is not None:
            image_t, mask_t = self.transform(image_t, mask_t)
        return image_t, mask_t, row

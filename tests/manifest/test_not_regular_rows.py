"""A manifest row whose file is a fifo, a socket or a folder is refused, never opened: ``validate``,
``verify`` and the hash check name the row and the file ("not a regular file") in one line.

A fifo in these tests has a writer thread behind it that feeds it junk bytes, so code that
wrongly opens it reads junk (and the test fails on the message) instead of blocking forever.
"""

from __future__ import annotations

import os
import socket
import stat
import threading

import pytest
from cli_helpers import run_cli

from defectforge.data.files import NotRegularFile, not_regular, sha256_file
from defectforge.errors import ManifestError
from defectforge.manifest.io import read_manifest
from defectforge.manifest.validate import check_hashes, verify_hashes
from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate

P = GenerateParams(n_per_defect=1, shard_size=2, seed=0)


@pytest.fixture(scope="module")
def generated(sample_manifests, tmp_path_factory):
    """A generate output made once; each test works on its own copy (:func:`copy`)."""
    return run_generate(P, sample_manifests[1], tmp_path_factory.mktemp("gen") / "gen", progress=False)


@pytest.fixture
def copy(generated, tmp_path):
    import shutil

    root = tmp_path / "gen"
    shutil.copytree(generated, root, symlinks=True)
    manifest = root / "copy-paste" / "manifest"
    row = read_manifest(manifest).to_pandas().sort_values("sample_id").iloc[0]
    return root, manifest, row


class _FedFifo:
    """A fifo at ``path`` whose writer (a thread) gives junk to any reader that opens it."""

    def __init__(self, path):
        self.path = str(path)
        os.mkfifo(self.path)
        self.thread = threading.Thread(target=self._feed, daemon=True)
        self.thread.start()

    def _feed(self):
        with open(self.path, "wb") as f:  # blocks until someone opens the read end
            f.write(b"junk, not an image")

    def close(self):
        if self.thread.is_alive():  # nobody opened it (as it should be): open the read end ourselves
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self.thread.join()
            os.close(fd)


def _replace(path, kind, request):
    """Put a ``kind`` node where the file ``path`` was."""
    path.unlink()
    if kind == "fifo":
        fifo = _FedFifo(path)
        request.addfinalizer(fifo.close)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        here = os.getcwd()
        os.chdir(path.parent)  # a socket's path is limited to 108 bytes: bind by its short name
        try:
            s.bind(path.name)
        finally:
            os.chdir(here)
        request.addfinalizer(s.close)
    elif kind == "device":
        try:  # /dev/null's numbers: reading it, if it were read, ends at once
            os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except (PermissionError, OSError) as exc:
            pytest.skip(f"cannot make a device node here ({exc})")
    else:
        path.mkdir()


KINDS = {"fifo": "a fifo", "socket": "a socket", "device": "a character device", "folder": "a folder"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_validate_and_verify_refuse_the_row_in_one_line(copy, kind, request):
    root, manifest, row = copy
    _replace(root / row.image_path, kind, request)
    for cmd in (["validate", manifest], ["validate", manifest, "--no-hashes"], ["verify", manifest]):
        r = run_cli(*cmd)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, (cmd, r.stdout + r.stderr)
        line = errors[0]
        assert f"row {row.sample_id}" in line and str(root / row.image_path) in line, line
        assert f"not a regular file ({KINDS[kind]})" in line, line


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_hash_check_names_the_row_without_opening_it(copy, kind, request):
    root, manifest, row = copy
    _replace(root / row.mask_path, kind, request)
    df = read_manifest(manifest).to_pandas()
    bad = [m for m in verify_hashes(df, root, workers=1) if m.problem is not None]
    assert [(m.row_id, m.column, m.problem) for m in bad] == [(row.sample_id, "mask_sha256", KINDS[kind])]
    assert "not a regular file" in bad[0].line() and str(root / row.mask_path) in bad[0].line()
    with pytest.raises(ManifestError, match=f"row {row.sample_id}: .* is not a regular file"):
        check_hashes(manifest)


def test_sha256_file_refuses_what_is_not_a_regular_file(tmp_path, request):
    fifo = _FedFifo(tmp_path / "f.png")
    request.addfinalizer(fifo.close)
    assert not_regular(fifo.path) == "a fifo" and not_regular(tmp_path) == "a folder"
    assert not_regular(tmp_path / "missing") is None
    with pytest.raises(NotRegularFile, match="not a regular file \\(a fifo\\)"):
        sha256_file(fifo.path)
    if os.path.exists("/dev/null"):
        assert not_regular("/dev/null") == "a character device"
        with pytest.raises(NotRegularFile, match="character device"):
            sha256_file("/dev/null")


def test_a_fifo_named_like_a_shard_is_refused_not_read(copy, request):
    root, manifest, _ = copy
    shard = sorted(manifest.glob("part-*.parquet"))[-1]
    _replace(shard, "fifo", request)
    with pytest.raises(ManifestError, match=f"{shard}: not a regular file \\(a fifo\\)"):
        read_manifest(manifest)


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_consumer_read_refuses_it_too(copy, kind, request):
    from defectforge.publish.consume import ManifestDataset
    from defectforge.errors import DefectforgeError

    root, manifest, row = copy
    _replace(root / row.image_path, kind, request)
    data = ManifestDataset(read_manifest(manifest), root=root)
    with pytest.raises(DefectforgeError, match=f"{root / row.image_path}: not a regular file"):
        data.read_bytes(row.image_path)

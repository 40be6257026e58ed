"""validate never reads outside a manifest's dataset root: a row whose file is a symlink leading
out, a root that climbs above the project (``../..``) and a root that is a symlink to a folder
outside are refused with one line and exit 2 - the confinement ingest and ManifestDataset apply."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import run_cli

from defectforge.data.files import sha256_file, write_png
from defectforge.manifest.io import write_manifest
from defectforge.manifest.schema import META_ROOT


def _png(path, value):
    write_png(path, np.full((16, 16, 3), value, np.uint8))


def _mask(path):
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    write_png(path, mask)


def _rows(folder, names):
    """Source rows for the images ``names`` (and their masks) under ``folder``, with their real hashes."""
    return [dict(image_id=f"cat/crack/{i:03d}", category="cat", defect_type="crack", image_path=n, mask_path=n.replace(".png", "_mask.png"),
                 width=16, height=16, image_sha256=sha256_file(folder / n), mask_sha256=sha256_file(folder / n.replace(".png", "_mask.png")),
                 mask_area=16, origin="test") for i, n in enumerate(names)]


@pytest.fixture
def layout(tmp_path):
    """A project (dvc.yaml marks it) with data/ inside, and a folder outside it holding 'system' files."""
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "dvc.yaml").write_text("stages: {}\n")
    for i in range(2):
        _png(proj / f"data/img{i}.png", 60 + 40 * i)
        _mask(proj / f"data/img{i}_mask.png")
    outside = tmp_path / "system"
    outside.mkdir()
    _png(outside / "secret.png", 7)
    _mask(outside / "secret_mask.png")
    return proj, outside


def _error(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "valid" not in r.stdout, r.stdout + r.stderr
    return lines[0]


def test_intact_manifest_in_its_project_passes(layout):
    proj, _ = layout
    man = write_manifest(_rows(proj / "data", ["img0.png", "img1.png"]), proj / "manifests/source.parquet", kind="source", dataset_root=proj / "data")
    r = run_cli("validate", man)
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr
    assert run_cli("verify", man).returncode == 0


def test_row_symlink_out_of_the_root_is_refused(layout):
    proj, outside = layout
    (proj / "data/img1.png").unlink()
    (proj / "data/img1.png").symlink_to(outside / "secret.png")  # inside the root, pointing at a system file
    man = write_manifest(_rows(proj / "data", ["img0.png", "img1.png"]), proj / "manifests/source.parquet", kind="source", dataset_root=proj / "data")
    for cmd in (("validate",), ("validate", "--no-hashes"), ("verify",)):
        line = _error(run_cli(*cmd, man))
        assert "cat/crack/001" in line and "img1.png" in line and "outside the dataset root" in line, line


def _with_root(man, root: str):
    t = pq.read_table(man)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, META_ROOT: root.encode()}), man)
    return man


def test_root_climbing_above_the_project_is_refused(layout, tmp_path):
    proj, outside = layout
    # rows that name the outside files relative to the folder holding the project, root ../..
    man = write_manifest(_rows(tmp_path, ["system/secret.png"]), proj / "manifests/source.parquet", kind="source", dataset_root=tmp_path)
    man = _with_root(man, "../..")
    for cmd in (("validate",), ("verify",)):
        line = _error(run_cli(*cmd, man))
        assert "'../..'" in line and "above" in line, line


def test_root_symlinked_to_a_folder_outside_is_refused(layout):
    proj, outside = layout
    (proj / "link").symlink_to(outside, target_is_directory=True)
    man = write_manifest(_rows(outside, ["secret.png"]), proj / "manifests/source.parquet", kind="source", dataset_root=outside)
    man = _with_root(man, "../link")
    for cmd in (("validate",), ("verify",)):
        line = _error(run_cli(*cmd, man))
        assert "'../link'" in line and "symlink" in line, line
    # told where the data may be, the same root is accepted
    assert run_cli("validate", "--within", outside, man).returncode == 0

"""The consumer side reads only inside the dataset root (issue 10): the root stored in a
manifest, the row paths and the release name cannot point it anywhere else."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import defectforge
from defectforge.data.files import sha256_file, write_png
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import write_manifest
from defectforge.manifest.schema import META_ROOT


def _project(base):
    """A project (dvc.yaml marks it) with two images and masks in data/ and release v1 of 'sample'."""
    proj = base / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "dvc.yaml").write_text("stages: {}\n")
    rows = []
    for i in range(2):
        write_png(proj / f"data/img{i}.png", np.full((16, 16, 3), 60 + 40 * i, np.uint8))
        mask = np.zeros((16, 16), bool)
        mask[4:8, 4:8] = True
        write_png(proj / f"data/img{i}_mask.png", mask)
        rows.append(dict(image_id=f"cat/crack/{i:03d}", category="cat", defect_type="crack", image_path=f"img{i}.png",
                         mask_path=f"img{i}_mask.png", width=16, height=16, image_sha256=sha256_file(proj / f"data/img{i}.png"),
                         mask_sha256=sha256_file(proj / f"data/img{i}_mask.png"), mask_area=16, origin="test"))
    man = write_manifest(rows, proj / "releases/sample/v1/manifest.parquet", kind="source", dataset_root=proj / "data")
    return proj, man


def _set_root(manifest, root: str):
    t = pq.read_table(manifest)
    pq.write_table(t.replace_schema_metadata({**t.schema.metadata, META_ROOT: root.encode()}), manifest)


def _other(base):
    """A folder outside the project holding files with the manifest's names (what an attacker would point at)."""
    other = base / "other"
    other.mkdir()
    for i in range(2):
        write_png(other / f"img{i}.png", np.full((16, 16, 3), 255, np.uint8))
        write_png(other / f"img{i}_mask.png", np.ones((16, 16), bool))
    return other


def test_load_and_read_inside_the_project(tmp_path):
    proj, man = _project(tmp_path)
    table = defectforge.load(name="sample", version=1, repo=str(proj))
    assert table.num_rows == 2
    image, mask, row = defectforge.ManifestDataset(table)[0]
    assert image.shape == (3, 16, 16) and mask.sum() == 16
    assert defectforge.load(man).num_rows == 2  # a path: confined to its project (dvc.yaml)


@pytest.mark.parametrize("how", ["absolute", "relative-out", "climb", "symlink"])
def test_dataset_root_metadata_pointing_outside_is_refused(tmp_path, how):
    proj, man = _project(tmp_path)
    other = _other(tmp_path)
    if how == "absolute":
        _set_root(man, str(other))
    elif how == "relative-out":
        _set_root(man, os.path.relpath(other, man.parent))
    elif how == "climb":
        _set_root(man, "../" * 30)  # the report's ../../../../.. that opened /etc/passwd
    else:  # the stored root is fine, but the folder is a symlink out of the project
        (proj / "data").rename(tmp_path / "moved")
        (proj / "data").symlink_to(other)
    for call in (lambda: defectforge.load(name="sample", version=1, repo=str(proj)), lambda: defectforge.load(man)):
        with pytest.raises(DefectforgeError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and "manifest.parquet" in msg and ("absolute" in msg or "outside" in msg), msg


@pytest.mark.parametrize("path", ["/etc/passwd", "../../../../../../../../etc/passwd", "sub/../../outside.png", "link.png"])
def test_hand_built_table_cannot_open_files_outside_its_root(tmp_path, path):
    root = tmp_path / "root"
    root.mkdir()
    write_png(tmp_path / "outside.png", np.zeros((8, 8, 3), np.uint8))
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    table = pa.table({"image_path": [path], "mask_path": [path]})
    with pytest.raises(DefectforgeError, match="root"):
        defectforge.ManifestDataset(table)  # no root recorded: refused rather than the current folder
    with pytest.raises(DefectforgeError, match="root") as e:
        defectforge.ManifestDataset(table, root=root)[0]
    assert "\n" not in str(e.value)


def test_row_path_through_a_symlink_in_a_loaded_release_is_refused(tmp_path):
    proj, man = _project(tmp_path)
    other = _other(tmp_path)
    (proj / "data/img0.png").unlink()
    (proj / "data/img0.png").symlink_to(other / "img0.png")
    ds = defectforge.ManifestDataset(defectforge.load(name="sample", version=1, repo=str(proj)))
    with pytest.raises(DefectforgeError, match="outside the dataset root"):
        ds[0]
    assert ds[1][0].shape == (3, 16, 16)


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(name="../../evil", version=1), "name="),
    (dict(name="Sample", version=1), "name="),
    (dict(name="sample/../../x", version=1), "name="),
    (dict(name="sample", version=0), "version="),
    (dict(name="sample", version=-1), "version="),
    (dict(name="sample", version="1/../../x"), "version="),
    (dict(name="sample", version=True), "version="),
    (dict(name="sample", version=1.5), "version="),
])
def test_load_by_name_validates_name_and_version(tmp_path, kwargs, culprit):
    proj, _ = _project(tmp_path)
    # what "../../evil" would reach: a manifest outside releases/
    evil = write_manifest(pq.read_table(proj / "releases/sample/v1/manifest.parquet"), tmp_path / "evil/v1/manifest.parquet",
                          kind="source", dataset_root=proj / "data")
    assert evil.is_file()
    with pytest.raises(DefectforgeError) as e:
        defectforge.load(repo=str(proj), **kwargs)
    assert culprit in str(e.value) and "\n" not in str(e.value)
    assert defectforge.load(name="sample", version="v1", repo=str(proj)).num_rows == 2


def test_releases_folder_symlinked_out_of_the_repo_is_refused(tmp_path):
    proj, man = _project(tmp_path)
    outside = tmp_path / "outside_releases"
    (proj / "releases").rename(outside)
    (proj / "releases").symlink_to(outside)
    with pytest.raises(DefectforgeError, match="outside"):
        defectforge.load(name="sample", version=1, repo=str(proj))

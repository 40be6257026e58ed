"""Releases in a temporary git repository with a local DVC remote, read back by the consumer side:
publish, no new version when nothing changed, a fresh clone of the tag pulls the version, the
dvc.api path at the tag, and a change making v2."""

import sys

import pytest
import yaml

import defectforge
from defectforge.publish.versions import list_versions, publish


@pytest.fixture(scope="module")
def project(tmp_path_factory, reproduced):
    """A DVC project with a local remote, after `dvc repro` (a copy of the session's)."""
    return reproduced.copy(tmp_path_factory.mktemp("release"))


@pytest.mark.slow
def test_publish_pull_load_and_no_change_no_version(project, tmp_path, run_cmd):
    _run = run_cmd
    r1 = publish(project, "sample")
    assert r1.created and r1.version == 1 and r1.tag == "dataset/sample/v1"
    assert "dataset/sample/v1" in _run(["git", "tag"], project)
    rows = defectforge.load(name="sample", version=1, repo=str(project)).to_pandas()
    assert (rows.dataset_version == "sample/v1").all() and len(rows) == 8

    # nothing changed: no new version, no new tag
    r2 = publish(project, "sample")
    assert not r2.created and r2.version == 1
    assert _run(["git", "tag"], project).split() == ["dataset/sample/v1"]
    assert [v["version"] for v in list_versions(project, "sample")] == [1]

    # a fresh clone pulls the tag's version from the DVC remote (publish pushes only the version) and reads the same rows
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", "--branch", "dataset/sample/v1", str(project), str(clone)], tmp_path)
    _run([sys.executable, "-m", "dvc", "pull", "-q", "releases/sample/v1"], clone)
    pulled = defectforge.load(name="sample", version=1, repo=str(clone))
    assert sorted(pulled.column("sample_id").to_pylist()) == sorted(rows.sample_id)
    ds = defectforge.ManifestDataset(pulled)
    image, mask, row = ds[0]
    assert image.shape[0] == 3 and mask.shape[0] == 1 and mask.sum() > 0 and row["dataset_version"] == "sample/v1"

    # dvc.api path (no working copy of the data): reads the manifest at the tag
    crack = defectforge.load(name="sample", version=1, repo=str(project) + "/.git", filters={"defect_type": "crack"})
    assert set(crack.column("defect_type").to_pylist()) == {"crack"} and crack.num_rows == 2

    # a change makes v2
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generate"]["n_per_defect"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    _run([sys.executable, "-m", "dvc", "repro"], project)
    _run(["git", "commit", "-qam", "more samples"], project)
    r3 = publish(project, "sample")
    assert r3.created and r3.version == 2
    out = _run([sys.executable, "-m", "defectforge.cli", "list-versions", "sample", "--repo", str(project)], project)
    assert "dataset/sample/v1" in out and "dataset/sample/v2" in out and "12 samples" in out

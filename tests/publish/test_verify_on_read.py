"""Consumers verify what they read: a published image replaced by another valid PNG fails the item
with one line naming the row and the file; ``verify=False`` reads it; ``defectforge verify DIR``
checks a copied version (what a ``dvc get`` user runs)."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import run_cli

import defectforge
from defectforge.data.codec import read_image, read_mask
from defectforge.data.files import write_png
from defectforge.errors import DefectforgeError
from defectforge.params.generate import GenerateParams
from defectforge.params.release import ReleaseParams
from defectforge.pipeline import release
from defectforge.pipeline.generate import run as run_generate


@pytest.fixture
def project(sample_manifests, tmp_path):
    """A project (dvc.yaml marks it) holding a generate output and its release as releases/sample/v1."""
    _, split = sample_manifests
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text("stages: {}\n")
    gen = run_generate(GenerateParams(n_per_defect=1, shard_size=2, seed=0, methods=["copy-paste"]), split, proj / "data/generated", progress=False)
    release.run(ReleaseParams(), gen, proj / "releases/sample/v1")
    return proj


def _row_index(table, sample_id):
    return table.column("sample_id").to_pylist().index(sample_id)


def test_replaced_image_fails_the_read_naming_row_and_file(project):
    table = defectforge.load(name="sample", version=1, repo=str(project))
    ds = defectforge.ManifestDataset(table)
    for i in range(len(ds)):
        ds[i]  # an intact release reads without a word
    row = table.slice(1, 1).to_pylist()[0]
    path = project / "releases/sample/v1" / (table.schema.metadata[b"defectforge.load.root"].decode()) / row["image_path"]
    path = path.resolve()
    write_png(path, np.ascontiguousarray(255 - read_image(path)))  # another valid PNG, same size
    with pytest.raises(DefectforgeError) as err:
        defectforge.ManifestDataset(defectforge.load(name="sample", version=1, repo=str(project)))[1]
    msg = str(err.value)
    assert "\n" not in msg and row["sample_id"] in msg and row["image_path"] in msg and "image_sha256" in msg, msg
    image, _, got = defectforge.ManifestDataset(table, verify=False)[1]  # the switch: read as is
    assert got["sample_id"] == row["sample_id"] and image.shape[0] == 3
    defectforge.ManifestDataset(defectforge.load(name="sample", version=1, repo=str(project), verify=False))[1]
    ds[0]  # the other rows still read


def test_replaced_mask_fails_too(project):
    table = defectforge.load(name="sample", version=1, repo=str(project))
    row = table.slice(0, 1).to_pylist()[0]
    root = project / "releases/sample/v1" / table.schema.metadata[b"defectforge.load.root"].decode()
    mask = (root / row["mask_path"]).resolve()
    write_png(mask, ~read_mask(mask))
    with pytest.raises(DefectforgeError, match=f"row {row['sample_id']}: .*mask_sha256"):
        defectforge.ManifestDataset(table)[0]


def test_each_file_is_read_once_and_hashed_from_those_bytes(project):
    table = defectforge.load(name="sample", version=1, repo=str(project))
    calls = []

    def opener(path):
        calls.append(path)
        with open(path, "rb") as f:
            return f.read()

    image, mask, row = defectforge.ManifestDataset(table, opener=opener)[0]
    assert len(calls) == 2 and len(set(calls)) == 2
    bad = defectforge.ManifestDataset(table, opener=lambda p: opener(p) + b"\0")  # bytes that differ from the file's hash
    with pytest.raises(DefectforgeError, match="does not match"):
        bad[0]


def test_verify_command_checks_a_copied_version(project):
    v1 = project / "releases/sample/v1"
    r = run_cli("verify", v1)
    assert r.returncode == 0 and "every file matches its sha256" in r.stdout, r.stdout + r.stderr
    table = defectforge.load(name="sample", version=1, repo=str(project))
    row = table.slice(0, 1).to_pylist()[0]
    path = (v1 / table.schema.metadata[b"defectforge.load.root"].decode() / row["image_path"]).resolve()
    write_png(path, np.ascontiguousarray(255 - read_image(path)))
    r = run_cli("verify", v1)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and row["sample_id"] in errors[0] and row["image_path"] in errors[0], r.stderr

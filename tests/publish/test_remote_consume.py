"""A data team's path, end to end (issue 10): publish a tiny release into a git repository
with a bare git remote (file://) and a local DVC remote, then read every image and mask
from elsewhere - through ``load(repo=<git URL>)``, a fresh clone with ``dvc pull`` of the
version only, and ``dvc get`` - and check the bytes against the manifest's hashes.

The release is built by hand (a few PNGs and a manifest), not by running the DAG.
"""

import hashlib
import json
import sys

import numpy as np
import pytest

import defectforge
from defectforge.data.io import sha256_file, write_png
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import write_manifest
from defectforge.pipeline.release import content_version
from defectforge.publish.versions import publish

DVC = [sys.executable, "-m", "dvc"]
N = 3


def _tiny_release(proj):
    """data/generated/... PNGs and data/release/{manifest.parquet, release.json, README.md}."""
    data = proj / "data"
    rows = []
    for i in range(N):
        sid = f"{i:02d}" + "ab" * 31
        sub = f"cat/crack/{sid}.png"
        img = np.zeros((16, 16, 3), np.uint8)
        img[..., 0] = 30 * i + 10
        img[4:9, 4:9, 1] = 200
        mask = np.zeros((16, 16), bool)
        mask[4:9, 4:9] = True
        h_img = write_png(data / f"generated/copy-paste/images/{sub}", img)
        h_mask = write_png(data / f"refined/masks/{sub}", mask)
        h_raw = write_png(data / f"generated/copy-paste/raw_masks/{sub}", mask)
        rows.append(dict(sample_id=sid, category="cat", defect_type="crack", method="copy-paste",
                         image_path=f"generated/copy-paste/images/{sub}", mask_path=f"refined/masks/{sub}",
                         raw_mask_path=f"generated/copy-paste/raw_masks/{sub}", source_image_id=f"cat/good/{i:03d}",
                         source_sha256="0" * 64, defect_source_id=f"cat/crack/{i:03d}", image_sha256=h_img,
                         mask_sha256=h_mask, raw_mask_sha256=h_raw, seed=i, params_sha256="1" * 64, method_config="{}",
                         width=16, height=16, mask_area=25, raw_mask_area=25))
    man = write_manifest(rows, data / "release/manifest.parquet", kind="synthetic", dataset_root=data)
    (data / "release/release.json").write_text(json.dumps({"dataset_version": f"tiny@{content_version(man)}", "samples": N}))
    (data / "release/README.md").write_text("# tiny\n")
    return rows


@pytest.fixture
def published(tmp_path, run_cmd):
    origin = tmp_path / "origin.git"
    run_cmd(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    proj = tmp_path / "factory"
    proj.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                DVC + ["init", "-q"], DVC + ["config", "core.analytics", "false"],
                DVC + ["remote", "add", "-d", "store", str(tmp_path / "dvc-remote")],
                ["git", "remote", "add", "origin", origin.as_uri()]):
        run_cmd(cmd, proj)
    # a git-tracked metric file (cache: false) and a big DVC-tracked model a consumer must not fetch
    (proj / "dvc.yaml").write_text("stages:\n  quality:\n    cmd: 'true'\n    metrics:\n"
                                   "      - data/quality/metrics.json:\n          cache: false\n")
    (proj / "data/models").mkdir(parents=True)
    (proj / "data/models/unet.bin").write_bytes(b"\x01" * 4096)
    run_cmd(DVC + ["add", "-q", "data/models/unet.bin"], proj)
    run_cmd(["git", "add", "-A"], proj)
    run_cmd(["git", "commit", "-qm", "factory"], proj)
    rows = _tiny_release(proj)
    (proj / "data/quality").mkdir()
    (proj / "data/quality/metrics.json").write_text('{"pass_rate": 1.0}\n')  # written by the run, not yet committed
    r = publish(proj, "tiny")
    assert r.created and r.tag == "dataset/tiny/v1" and r.pushed == ("dvc", "git origin")
    return origin, proj, {row["sample_id"]: row for row in rows}


def _read_all_and_check(table, rows):
    ds = defectforge.ManifestDataset(table)
    assert len(ds) == N
    for i in range(len(ds)):
        image, mask, row = ds[i]
        assert image.shape == (3, 16, 16) and mask.sum() == 25
        want = rows[row["sample_id"]]
        assert hashlib.sha256(ds.read_bytes(row["image_path"])).hexdigest() == want["image_sha256"] == row["image_sha256"]
        assert hashlib.sha256(ds.read_bytes(row["mask_path"])).hexdigest() == want["mask_sha256"] == row["mask_sha256"]
    return ds


def test_consumer_reads_every_pixel_from_the_remote(published, tmp_path, run_cmd):
    origin, proj, rows = published
    url = origin.as_uri()

    # 1. load(repo=<git URL>) + ManifestDataset: every image and mask, hashes match
    table = defectforge.load(name="tiny", version=1, repo=url)
    assert set(table.column("dataset_version").to_pylist()) == {"tiny/v1"}
    _read_all_and_check(table, rows)

    # 2. a fresh clone of the tag pulls that version only (no models) and reads it locally
    clone = tmp_path / "consumer"
    run_cmd(["git", "clone", "-q", "--branch", "dataset/tiny/v1", url, str(clone)], tmp_path)
    # the tagged commit holds the run's git-tracked metric file
    assert json.loads((clone / "data/quality/metrics.json").read_text()) == {"pass_rate": 1.0}
    run_cmd(DVC + ["pull", "-q", "releases/tiny/v1"], clone)
    assert not (clone / "data/models/unet.bin").exists()
    assert not (clone / "data/generated").exists()  # pixels come from the version folder itself
    local = defectforge.load(name="tiny", version=1, repo=str(clone))
    ds = _read_all_and_check(local, rows)
    assert ds.repo is None and ds.root.endswith("releases/tiny/v1")

    # 3. dvc get of the version folder returns the pixels
    got = tmp_path / "got"
    run_cmd(DVC + ["get", url, "releases/tiny/v1", "--rev", "dataset/tiny/v1", "-o", str(got)], tmp_path)
    for row in rows.values():
        assert sha256_file(got / row["image_path"]) == row["image_sha256"]
        assert sha256_file(got / row["mask_path"]) == row["mask_sha256"]


def test_publish_without_dvc_remote_is_refused_before_anything_is_made(tmp_path, run_cmd):
    proj = tmp_path / "factory"
    proj.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                DVC + ["init", "-q"]):
        run_cmd(cmd, proj)
    run_cmd(["git", "commit", "-qm", "init"], proj)
    _tiny_release(proj)
    with pytest.raises(DefectforgeError, match="no DVC remote configured"):
        publish(proj, "tiny")
    assert not (proj / "releases").exists()
    assert run_cmd(["git", "tag"], proj).strip() == ""


def test_manifest_dataset_in_a_dataloader_with_the_default_collate(tmp_path):
    """None fields (no attention map, no QC yet) and ragged qc_reasons lists collate into a batch."""
    import torch
    from torch.utils.data import DataLoader

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "dvc.yaml").write_text("stages: {}\n")
    rows = _tiny_release(proj)
    rows[0].update(qc_pass=True, qc_reasons=[], qc_bg_psnr=41.5)
    rows[1].update(qc_pass=False, qc_reasons=["saturated", "colour drift"])  # rows[2]: QC columns all missing
    man = write_manifest(rows, proj / "data/release/manifest.parquet", kind="synthetic", dataset_root=proj / "data")
    ds = defectforge.ManifestDataset(defectforge.load(man))
    batches = list(DataLoader(ds, batch_size=2))
    assert [b[0].shape for b in batches] == [torch.Size([2, 3, 16, 16]), torch.Size([1, 3, 16, 16])]
    assert [b[1].shape for b in batches] == [torch.Size([2, 1, 16, 16]), torch.Size([1, 1, 16, 16])]
    first, last = batches[0][2], batches[1][2]
    assert first["sample_id"] == [rows[0]["sample_id"], rows[1]["sample_id"]]
    assert first["attention_path"] == ["", ""] and first["qc_reasons"] == ["", "saturated; colour drift"]
    assert first["qc_pass"].tolist() == [True, False] and first["seed"].tolist() == [0, 1]
    assert first["qc_bg_psnr"][0].item() == 41.5 and torch.isnan(first["qc_bg_psnr"][1])
    assert last["qc_pass"].tolist() == [False] and torch.isnan(last["qc_bg_psnr"]).all()
    # the rows as stored stay available (with None and lists) for a custom collate_fn
    raw = defectforge.ManifestDataset(defectforge.load(man), raw_rows=True)
    assert raw[2][2]["qc_pass"] is None and raw[1][2]["qc_reasons"] == ["saturated", "colour drift"]

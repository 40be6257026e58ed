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
import yaml

import defectforge
from defectforge.data.files import sha256_file, write_png
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


def _factory(tmp_path, run_cmd, remote_flags=("-d",)):
    """A factory checkout as a team makes one: git + DVC, committed; then the DVC remote added
    the usual way (``dvc remote add -d``), after that commit, so .dvc/config is not committed."""
    origin = tmp_path / "origin.git"
    run_cmd(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    proj = tmp_path / "factory"
    proj.mkdir()
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "config", "user.email", "t@example.com"], ["git", "config", "user.name", "t"],
                DVC + ["init", "-q"], DVC + ["config", "core.analytics", "false"],
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
    store = tmp_path / "dvc-remote"
    run_cmd(DVC + ["remote", "add", *remote_flags, "store", str(store)], proj)
    return origin, proj, store


def sha256_md5(path):
    return hashlib.md5(path.read_bytes()).hexdigest()


def _md5_files(store):
    return {p.parent.name + p.name for p in (store / "files/md5").glob("*/*")} if store.exists() else set()


@pytest.fixture
def published(tmp_path, run_cmd):
    origin, proj, store = _factory(tmp_path, run_cmd)
    from defectforge import doctor

    # doctor reads the committed config: the remote is set, but a tag would not carry it
    check = doctor.check_dvc_remote(proj)
    assert not check.ok and "committed .dvc/config (git show HEAD:.dvc/config) has no default remote" in check.detail
    rows = _tiny_release(proj)
    (proj / "data/quality").mkdir()
    (proj / "data/quality/metrics.json").write_text('{"pass_rate": 1.0}\n')  # written by the run, not yet committed
    r = publish(proj, "tiny")
    assert r.created and r.tag == "dataset/tiny/v1"
    # publish committed .dvc/config with the remote, and said so
    assert any(n.startswith("committed .dvc/config with the default DVC remote store") for n in r.notes), r.notes
    assert "store" in run_cmd(["git", "show", "dataset/tiny/v1:.dvc/config"], proj)
    assert doctor.check_dvc_remote(proj).ok
    # only the version went to the DVC remote (its files, equal ones stored once, and its .dir), not the model
    out = yaml.safe_load((proj / "releases/tiny/v1.dvc").read_text())["outs"][0]
    on_disk = [p for p in (proj / "releases/tiny/v1").rglob("*") if p.is_file()]
    assert out["nfiles"] == len(on_disk) > 3 * N  # image, mask, raw mask per row + manifest, README, ...
    stored = _md5_files(store)
    assert stored == {out["md5"]} | {sha256_md5(p) for p in on_disk}
    model_md5 = yaml.safe_load((proj / "data/models/unet.bin.dvc").read_text())["outs"][0]["md5"]
    assert model_md5 not in stored
    assert r.pushed == (f"dvc store: releases/tiny/v1 ({len(on_disk)} files, {sum(p.stat().st_size for p in on_disk)} bytes): "
                        f"{len(stored)} files pushed", "git origin: main, dataset/tiny/v1")
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


def _dataloader_batches(table):
    from torch.utils.data import DataLoader

    batches = list(DataLoader(defectforge.ManifestDataset(table), batch_size=2))
    assert [tuple(b[0].shape) for b in batches] == [(2, 3, 16, 16), (1, 3, 16, 16)]
    assert sorted(sid for b in batches for sid in b[2]["sample_id"]) == sorted(table.column("sample_id").to_pylist())
    return batches


def test_consumer_reads_every_pixel_from_the_remote(published, tmp_path, run_cmd):
    """A second, fresh directory reads the version from the git URL and the tag alone."""
    origin, proj, rows = published
    url = origin.as_uri()
    consumer = tmp_path / "consumer"
    consumer.mkdir()

    # 1. dvc get of the version folder, as the README says
    run_cmd(DVC + ["get", url, "releases/tiny/v1", "--rev", "dataset/tiny/v1"], consumer)
    for row in rows.values():
        assert sha256_file(consumer / "v1" / row["image_path"]) == row["image_sha256"]
        assert sha256_file(consumer / "v1" / row["mask_path"]) == row["mask_sha256"]

    # 2. load(repo=<git URL>) -> ManifestDataset -> DataLoader: every image and mask, hashes match
    table = defectforge.load(name="tiny", version=1, repo=url)
    assert set(table.column("dataset_version").to_pylist()) == {"tiny/v1"}
    _read_all_and_check(table, rows)
    _dataloader_batches(table)

    # 3. dvc import into the consumer's own DVC project
    own = consumer / "project"
    (own / "data").mkdir(parents=True)
    for cmd in (["git", "init", "-q"], DVC + ["init", "-q"]):
        run_cmd(cmd, own)
    run_cmd(DVC + ["import", url, "releases/tiny/v1", "--rev", "dataset/tiny/v1", "-o", "data/tiny"], own)
    imported = defectforge.load(own / "data/tiny/manifest.parquet")
    _read_all_and_check(imported, rows)

    # 4. a fresh clone of the tag pulls that version only (no models) and reads it locally
    clone = consumer / "clone"
    run_cmd(["git", "clone", "-q", "--branch", "dataset/tiny/v1", url, str(clone)], consumer)
    # the tagged commit holds the run's git-tracked metric file
    assert json.loads((clone / "data/quality/metrics.json").read_text()) == {"pass_rate": 1.0}
    run_cmd(DVC + ["pull", "-q", "releases/tiny/v1"], clone)
    assert not (clone / "data/models/unet.bin").exists()
    assert not (clone / "data/generated").exists()  # pixels come from the version folder itself
    local = defectforge.load(name="tiny", version=1, repo=str(clone))
    ds = _read_all_and_check(local, rows)
    assert ds.repo is None and ds.root.endswith("releases/tiny/v1")


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


def _cli(args, cwd):
    import subprocess

    return subprocess.run([sys.executable, "-m", "defectforge.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**__import__("os").environ, "DVC_NO_ANALYTICS": "1"})


def test_a_no_push_version_is_pushed_by_the_next_publish(tmp_path, run_cmd):
    origin, proj, store = _factory(tmp_path, run_cmd)
    rows = _tiny_release(proj)
    r = publish(proj, "tiny", push=False)
    assert r.created and r.pushed == () and _md5_files(store) == set()
    assert run_cmd(["git", "ls-remote", "--tags", str(origin)], proj).strip() == ""
    # unchanged: no new version, but what is missing on the remotes (data, tag) is pushed, and said
    out = _cli(["publish", "--name", "tiny", "--repo", str(proj)], proj)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "unchanged, still tiny v1 (dataset/tiny/v1)"
    assert lines[1].startswith("  pushed: dvc store: releases/tiny/v1 (") and lines[1].endswith(" files pushed")
    assert lines[2] == "  pushed: git origin: main, dataset/tiny/v1"
    assert "dataset/tiny/v1" in run_cmd(["git", "ls-remote", "--tags", str(origin)], proj)
    assert run_cmd(["git", "tag"], proj).split() == ["dataset/tiny/v1"]
    # the consumer reads it from the tag alone
    table = defectforge.load(name="tiny", version=1, repo=origin.as_uri())
    _read_all_and_check(table, {row["sample_id"]: row for row in rows})
    # a third run finds everything there
    again = publish(proj, "tiny")
    assert not again.created and again.pushed[0].endswith("Everything is up to date.") and len(again.pushed) == 1


def test_publish_on_a_detached_head_is_refused_in_one_line(tmp_path, run_cmd):
    origin, proj, store = _factory(tmp_path, run_cmd)
    run_cmd(["git", "checkout", "-q", "--detach"], proj)  # what an interrupted `dvc exp run` leaves
    _tiny_release(proj)
    out = _cli(["publish", "--name", "tiny", "--repo", str(proj), "--no-push"], proj)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith("error: publish: HEAD is detached (at ") and "git checkout main" in out.stderr
    assert not (proj / "releases").exists() and run_cmd(["git", "tag"], proj).strip() == ""


def test_a_later_version_never_drops_an_earlier_ones_files(tmp_path, run_cmd):
    """`dvc exp apply` deleted releases/*/v*.dvc and the next publish rewrote the .gitignore with only the new version."""
    origin, proj, store = _factory(tmp_path, run_cmd)
    _tiny_release(proj)
    assert publish(proj, "tiny").version == 1
    (proj / "releases/tiny/v1.dvc").unlink()
    (proj / "releases/tiny/v1.json").unlink()
    (proj / "releases/tiny/.gitignore").write_text("")  # lost its lines
    info = json.loads((proj / "data/release/release.json").read_text())
    info["dataset_version"] = "tiny@" + "f" * 16  # another release
    (proj / "data/release/release.json").write_text(json.dumps(info))
    r = publish(proj, "tiny")
    assert r.created and r.version == 2
    assert {"restored from HEAD: releases/tiny/v1.dvc", "restored from HEAD: releases/tiny/v1.json"} <= set(r.notes)
    tree = run_cmd(["git", "ls-tree", "--name-only", "HEAD", "releases/tiny/"], proj).split()
    assert {"releases/tiny/v1.dvc", "releases/tiny/v1.json", "releases/tiny/v2.dvc", "releases/tiny/v2.json"} <= set(tree)
    assert set(run_cmd(["git", "show", "HEAD:releases/tiny/.gitignore"], proj).split()) == {"/v1", "/v2"}
    assert (proj / "releases/tiny/v1.dvc").is_file()


def test_a_private_remote_is_refused_unless_asked_and_consumers_pass_it(tmp_path, run_cmd):
    origin, proj, store = _factory(tmp_path, run_cmd, remote_flags=("--local", "-d"))  # .dvc/config.local
    rows = _tiny_release(proj)
    with pytest.raises(DefectforgeError, match=r"default DVC remote store is set in \.dvc/config\.local, not in the committed"):
        publish(proj, "tiny")
    assert not (proj / "releases").exists()
    r = publish(proj, "tiny", private_remote=True)
    assert r.created and r.pushed[0].startswith("dvc store: releases/tiny/v1") and any("remote=URL" in n for n in r.notes)
    url = origin.as_uri()
    with pytest.raises(DefectforgeError, match="load: cannot read releases/tiny/v1/manifest.parquet at dataset/tiny/v1"):
        defectforge.load(name="tiny", version=1, repo=url)
    table = defectforge.load(name="tiny", version=1, repo=url, remote=str(store))
    _read_all_and_check(table, {row["sample_id"]: row for row in rows})
    _dataloader_batches(table)

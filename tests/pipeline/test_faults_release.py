"""Faults met by the release stage end in one line and exit status 2, leaving no release and no
temporary folder: a full disk while the release is written, and an --out that is the current
folder (or holds it), which cannot be swapped into place."""

from __future__ import annotations

import errno
import os

import pytest
from cli_helpers import run_cli

from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate


@pytest.fixture
def generated(sample_manifests, tmp_path):
    _, split = sample_manifests
    out = run_generate(GenerateParams(n_per_defect=2, shard_size=2, seed=0, methods=["copy-paste"]), split, tmp_path / "gen", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text("release:\n  name: sample\n")
    return out, params


def _one_error(r) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return errors[0]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_disk_full_is_one_line_and_leaves_no_release(generated, tmp_path, monkeypatch, code):
    from defectforge.pipeline import release

    out, params = generated

    def full(*a, **k):  # what pyarrow raises: "Error writing bytes to file. Detail: [errno 28] ..."
        raise OSError(code, "Error writing bytes to file")

    monkeypatch.setattr(release, "write_manifest", full)
    before = set(os.listdir(tmp_path))
    line = _one_error(run_cli("release", "--generated", out, "--out", tmp_path / "rel", "--params", params))
    assert str(tmp_path / "rel") in line and "Error writing bytes" in line, line
    assert set(os.listdir(tmp_path)) == before  # no release, no .rel.*.tmp


@pytest.mark.parametrize("cwd", ["empty folder", "earlier release"])
@pytest.mark.parametrize("by", [".", "its path"])
def test_out_that_is_the_current_folder_is_refused(generated, tmp_path, monkeypatch, cwd, by):
    from defectforge.pipeline import release

    out, params = generated
    here = tmp_path / "here"
    if cwd == "earlier release":
        release.run(release.ReleaseParams(name="sample"), out, here, verify=False)
    else:
        here.mkdir()
    monkeypatch.chdir(here)
    before = {d: sorted(os.listdir(d)) for d in (tmp_path, here)}
    line = _one_error(run_cli("release", "--generated", out, "--out", "." if by == "." else here, "--params", params))
    assert "current folder" in line, line
    assert {d: sorted(os.listdir(d)) for d in before} == before  # no ..<random>.old/ or .tmp folder left, nothing replaced
    assert os.getcwd() == str(here) and os.path.isdir(here)

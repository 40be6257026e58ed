"""A half-made generate output (a run killed or failed part-way, its last shard lost) is never
released or validated as complete: both refuse with exit status 2 and one line saying how many
planned shards are missing and which command resumes the run."""

from __future__ import annotations

import json

import pytest
from cli_helpers import run_cli

from defectforge.errors import ManifestError
from defectforge.params.generate import GenerateParams
from defectforge.params.release import ReleaseParams
from defectforge.pipeline import release
from defectforge.pipeline.generate import run as run_generate

P = GenerateParams(n_per_defect=2, shard_size=2, seed=0, methods=["copy-paste"])


@pytest.fixture
def generated(sample_manifests, tmp_path):
    _, split = sample_manifests
    out = run_generate(P, split, tmp_path / "gen", progress=False)
    params = tmp_path / "params.yaml"
    params.write_text("release:\n  name: sample\n")
    return out, split, params


def _errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def test_complete_output_passes_and_records_its_plan(generated):
    from defectforge.manifest.validate import PLAN_INFO, check_complete

    out, split, params = generated
    info = json.loads((out / "copy-paste" / PLAN_INFO).read_text())
    shards = sorted((out / "copy-paste" / "manifest").glob("part-*.parquet"))
    assert info["shards"] == len(shards) >= 2 and info["split"] == str(split)
    check_complete(out)
    assert run_cli("validate", "--no-hashes", out).returncode == 0


@pytest.mark.parametrize("how", ["deleted", "junk"])
def test_lost_last_shard_is_refused_by_release_and_validate(generated, tmp_path, how):
    out, split, params = generated
    shards = sorted((out / "copy-paste" / "manifest").glob("part-*.parquet"))
    n = len(shards)
    if how == "deleted":  # as after kill -9 before the last shard was committed
        shards[-1].unlink()
    else:  # a file named like a shard that is not one
        shards[-1].write_bytes(b"not parquet")
    for target in (out, out / "copy-paste", out / "copy-paste" / "manifest"):
        r = run_cli("release", "--generated", target, "--out", tmp_path / "rel", "--params", params)
        assert r.returncode == 2, r.stdout + r.stderr
        (line,) = _errors(r.stderr)
        assert f"1 of {n} planned shards missing" in line and f"defectforge generate --split {split} --out {out}" in line, line
        assert not (tmp_path / "rel").exists()
        r = run_cli("validate", target)
        assert r.returncode == 2 and "valid" not in r.stdout, r.stdout + r.stderr
        (line,) = _errors(r.stderr)
        assert f"1 of {n} planned shards missing" in line and "resume it with" in line, line
    with pytest.raises(ManifestError, match="planned shards missing"):
        release.run(ReleaseParams(), out, tmp_path / "rel", verify=False)  # --no-verify does not skip it


def test_resuming_makes_it_releasable(generated, tmp_path):
    from defectforge.manifest.validate import check_complete

    out, split, params = generated
    sorted((out / "copy-paste" / "manifest").glob("part-*.parquet"))[-1].unlink()
    with pytest.raises(ManifestError):
        check_complete(out)
    run_generate(P, split, out, progress=False)  # the resume the message names
    check_complete(out)
    assert release.run(ReleaseParams(), out, tmp_path / "rel").is_file()

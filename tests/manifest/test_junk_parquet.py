"""A file that is not Parquet, or a truncated one, wherever a manifest or a qc table is read:
one line naming the file (ManifestError, exit 2), never pyarrow's ArrowInvalid traceback. The
shared readers (``read_parquet`` / ``read_parquet_schema`` in manifest/io.py) are tested through
several callers: read_manifest, assemble, ``validate``, ``refine --generated``, ``release --quality``."""

from __future__ import annotations

import shutil

import pytest
from cli_helpers import run_cli

from defectforge.errors import ManifestError
from defectforge.manifest.io import assemble, read_manifest
from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate

P = GenerateParams(n_per_defect=2, shard_size=2, seed=0)  # several shards: the bad one is not the first


@pytest.fixture(scope="module")
def generated(sample_manifests, tmp_path_factory):
    return run_generate(P, sample_manifests[1], tmp_path_factory.mktemp("junk") / "gen", progress=False)


def _spoil(shard, how):
    data = shard.read_bytes()
    shard.write_bytes(b"not parquet at all\n" * 3 if how == "junk" else data[: len(data) // 2])


@pytest.fixture(params=["junk", "truncated"])
def spoiled(generated, tmp_path, request):
    """(a copy of the generate folder, a plain shard folder without a plan, the spoiled shard's name)."""
    gen = tmp_path / "gen"
    shutil.copytree(generated, gen)
    shards = sorted((gen / "copy-paste" / "manifest").glob("part-*.parquet"))
    assert len(shards) >= 2
    _spoil(shards[-1], request.param)
    plain = tmp_path / "x" / "plain"  # shards alone: no plan, so the completeness check does not see the bad one first
    shutil.copytree(gen / "copy-paste" / "manifest", plain)
    return gen, plain, shards[-1].name


def _one_error(r) -> str:
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    return errors[0]


def test_read_manifest_and_assemble_name_the_bad_shard(spoiled, tmp_path):
    gen, plain, name = spoiled
    with pytest.raises(ManifestError, match=f"{plain / name}: not a readable Parquet file"):
        read_manifest(plain)
    with pytest.raises(ManifestError, match=f"{plain / name}: not a readable Parquet file"):
        read_manifest(plain, filters={"defect_type": "hole"}, columns=["sample_id"])
    with pytest.raises(ManifestError, match=f"{plain / name}: not a readable Parquet file"):
        assemble(plain, tmp_path / "all.parquet", kind="synthetic", dataset_root=gen)
    assert not (tmp_path / "all.parquet").exists()


def test_validate_names_the_bad_shard(spoiled):
    _, plain, name = spoiled
    line = _one_error(run_cli("validate", plain, "--no-hashes", "--within", plain.parent.parent))  # its root: two up
    assert f"{plain / name}: not a readable Parquet file" in line, line


def test_refine_names_the_bad_shard(spoiled, sample_manifests, tmp_path):
    gen, _, name = spoiled
    line = _one_error(run_cli("refine", "--split", sample_manifests[1], "--generated", gen, "--out", tmp_path / "refined"))
    assert f"{gen / 'copy-paste' / 'manifest' / name}: not a readable Parquet file" in line, line
    assert not (tmp_path / "refined").exists()


@pytest.mark.parametrize("how", ["junk", "truncated"])
def test_a_bad_qc_table_is_one_line_for_release(generated, tmp_path, how):
    quality = tmp_path / "quality"
    quality.mkdir()
    shutil.copy(sorted((generated / "copy-paste" / "manifest").glob("part-*.parquet"))[0], quality / "qc.parquet")
    _spoil(quality / "qc.parquet", how)
    (quality / "details.json").write_text("{}\n")
    line = _one_error(run_cli("release", "--generated", generated / "copy-paste" / "manifest", "--quality", quality,
                              "--out", tmp_path / "rel", "--no-verify", "-S", "release.name=junk-test"))
    assert f"{quality / 'qc.parquet'}: not a readable Parquet file" in line, line
    assert not (tmp_path / "rel").exists()

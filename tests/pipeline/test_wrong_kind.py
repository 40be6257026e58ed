"""A manifest of the wrong kind given to a stage is named as such in one line (which kind was
given, which one the option takes), not as a missing column or a traceback."""

from __future__ import annotations

import pytest
from cli_helpers import one_image_manifest, run_cli

from defectforge.manifest.io import write_manifest


@pytest.fixture
def split_manifest(tmp_path):
    return one_image_manifest(tmp_path, "split", split="test", fold=0)


@pytest.mark.parametrize("command", ["release", "quality", "detector"])
def test_a_split_given_as_refined_output_is_named(tmp_path, split_manifest, command):
    args = [command, "--refined", split_manifest, "--out", tmp_path / "out", "--params", tmp_path / "none.yaml"]
    if command != "release":
        args += ["--split", split_manifest]
    r = run_cli(*args)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert errors == [f"error: {split_manifest}: is a split manifest (the split stage's output), but {command} --refined "
                      "takes a synthetic manifest (the generate or refine stage's output)"], r.stderr
    assert not (tmp_path / "out").exists()


def test_a_release_check_failing_names_the_release_not_its_temporary_folder(tmp_path):
    from test_release import _refined

    manifest, rows = _refined(tmp_path)
    write_manifest(rows + rows[:1], manifest, kind="synthetic", dataset_root=tmp_path / "data")  # a sample twice
    out = tmp_path / "release"
    r = run_cli("release", "--refined", manifest, "--out", out, "--params", tmp_path / "none.yaml", "--no-verify")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"error: {out / 'manifest.parquet'}: ") and "be unique" in errors[0], errors[0]
    assert ".tmp" not in errors[0] and not out.exists()

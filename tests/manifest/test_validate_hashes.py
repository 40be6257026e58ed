"""Content hashes are verified where data changes hands (issue 10): ``validate`` re-hashes
every row's files in parallel; a file whose bytes were replaced is named with its row and
manifest, exit status 2; ``--no-hashes`` skips the check."""

from __future__ import annotations

import numpy as np
import pytest

from defectforge.cli import main
from defectforge.data.codec import encode_png, read_image
from defectforge.errors import ManifestError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.manifest.validate import check_hashes, verify_hashes
from defectforge.params.generate import GenerateParams
from defectforge.params.refine import RefineParams
from defectforge.pipeline.generate import run as run_generate
from defectforge.pipeline.refine import run as run_refine

P = GenerateParams(n_per_defect=1, shard_size=2, seed=0)


@pytest.fixture
def generated(sample_manifests, tmp_path):
    """(generated shard folder, its rows as a DataFrame, dataset root) - private to the test."""
    _, split = sample_manifests
    out = run_generate(P, split, tmp_path / "gen", progress=False)
    manifest = out / "copy-paste" / "manifest"
    return manifest, read_manifest(manifest).to_pandas().sort_values("sample_id").reset_index(drop=True), tmp_path / "gen"


def _tamper(path):
    """Same size, same format, other pixels: only the hash can tell."""
    img = read_image(path)
    path.write_bytes(encode_png(np.ascontiguousarray(255 - img)))


def test_intact_manifests_pass(generated, sample_manifests, tmp_path):
    manifest, df, root = generated
    assert verify_hashes(df, root) == []
    source, split = sample_manifests
    for m in (source, split):  # source rows: good images have no mask hash, they are skipped
        assert verify_hashes(read_manifest(m), manifest_info(m)["dataset_root"]) == []
    refined = run_refine(RefineParams(), split, root, tmp_path / "refined")
    assert verify_hashes(read_manifest(refined).to_pandas(), manifest_info(refined)["dataset_root"]) == []
    check_hashes(refined)


def test_replaced_bytes_are_found_with_row_column_and_file(generated):
    manifest, df, root = generated
    row_img, row_mask, row_gone = df.iloc[0], df.iloc[1], df.iloc[2]
    _tamper(root / row_img.image_path)
    (root / row_mask.raw_mask_path).write_bytes((root / row_mask.raw_mask_path).read_bytes() + b"\0")
    (root / row_gone.mask_path).unlink()
    serial, parallel = verify_hashes(df, root, workers=1), verify_hashes(df, root, workers=8)
    assert serial == parallel
    got = {(m.row_id, m.column, m.path, m.actual is None) for m in parallel}
    assert got == {
        (row_img.sample_id, "image_sha256", str(root / row_img.image_path), False),
        (row_mask.sample_id, "raw_mask_sha256", str(root / row_mask.raw_mask_path), False),
        (row_gone.sample_id, "mask_sha256", str(root / row_gone.mask_path), True),
    }
    with pytest.raises(ManifestError) as err:
        check_hashes(manifest)
    msg = str(err.value)
    assert str(manifest) in msg and row_img.sample_id in msg and row_img.image_path in msg and "3 file hash(es)" in msg


def _exit_code(argv) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_validate_command_checks_hashes_unless_told_not_to(generated, capsys):
    manifest, df, root = generated
    assert _exit_code(["validate", str(manifest)]) == 0
    row = df.iloc[1]
    _tamper(root / row.image_path)
    capsys.readouterr()
    assert _exit_code(["validate", str(manifest)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(manifest) in lines[0] and row.sample_id in lines[0] and row.image_path in lines[0]
    assert _exit_code(["validate", "--no-hashes", str(manifest)]) == 0

"""The command line's contract for bad input: one line naming the culprit, non-zero exit, nothing written."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.manifest.io import read_manifest, write_manifest

from cli_helpers import run_cli

_cli = run_cli


def _error_line(stderr: str) -> str:
    """The single error line (progress bars may share stderr); no traceback allowed."""
    assert "Traceback" not in stderr, stderr
    lines = [seg for line in stderr.replace("\r", "\n").splitlines() for seg in [line[line.find("error: "):]] if "error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def _mvtec(root: Path, *, mask_size=(32, 32), mask_value=255, corrupt=False, drop_mask=False):
    (root / "cat/train/good").mkdir(parents=True)
    (root / "cat/test/crack").mkdir(parents=True)
    (root / "cat/ground_truth/crack").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(root / f"cat/train/good/{i:03d}.png")
    img = root / "cat/test/crack/000.png"
    if corrupt:
        img.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    else:
        Image.fromarray(np.full((32, 32, 3), 50, np.uint8)).save(img)
    if not drop_mask:
        m = np.zeros(mask_size[::-1], np.uint8)
        m[4:10, 4:10] = mask_value
        Image.fromarray(m).save(root / "cat/ground_truth/crack/000_mask.png")
    return root


@pytest.mark.parametrize(
    "kwargs, culprit",
    [
        (dict(corrupt=True), "000.png"),
        (dict(mask_size=(16, 32)), "000_mask.png"),
        (dict(mask_value=0), "000_mask.png"),
        (dict(drop_mask=True), "000"),
    ],
)
def test_ingest_bad_dataset_one_line_and_nothing_written(tmp_path, kwargs, culprit):
    root = _mvtec(tmp_path / "ds", **kwargs)
    out = tmp_path / "out" / "source.parquet"
    r = _cli("ingest", "--layout", "mvtec", "--root", root, "--out", out, "--params", tmp_path / "none.yaml")
    assert r.returncode == 2
    err = _error_line(r.stderr)
    assert culprit in err, err
    assert not out.exists()


def test_ingest_unknown_layout_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli("ingest", "--layout", "coco", "--root", tmp_path / "empty", "--out", tmp_path / "s.parquet", "--params", tmp_path / "none.yaml")
    assert r.returncode == 2 and "data.layout" in _error_line(r.stderr)
    r = _cli("ingest", "--layout", "mvtec", "--root", tmp_path / "empty", "--out", tmp_path / "s.parquet", "--params", tmp_path / "none.yaml")
    assert r.returncode == 2 and str(tmp_path / "empty") in _error_line(r.stderr)
    assert not (tmp_path / "s.parquet").exists()


def test_ingest_good_dataset_and_validate(tmp_path):
    root = _mvtec(tmp_path / "ds")
    out = tmp_path / "source.parquet"
    r = _cli("ingest", "--layout", "mvtec", "--root", root, "--out", out, "--params", tmp_path / "none.yaml")
    assert r.returncode == 0, r.stderr
    assert "4 rows, valid" in r.stdout
    r = _cli("validate", out)
    # the row count and the per-type counts come from the file: 3 good + 1 crack
    assert r.returncode == 0 and f"{out}: source manifest, 4 rows, valid" in r.stdout
    assert "cat/crack: 1" in r.stdout and "cat/good: 3" in r.stdout


def test_validate_lists_failures_and_exits_nonzero(tmp_path):
    root = _mvtec(tmp_path / "ds")
    out = tmp_path / "source.parquet"
    assert _cli("ingest", "--layout", "mvtec", "--root", root, "--out", out, "--params", tmp_path / "none.yaml").returncode == 0
    df = read_manifest(out).to_pandas()
    (root / df.image_path.iloc[0]).unlink()
    r = _cli("validate", out)
    assert r.returncode == 1
    assert "expectation(s) failed" in r.stderr and df.image_path.iloc[0] in r.stderr


def test_bad_params_key_stops_a_stage(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("split:\n  scheme: halves\n")
    r = subprocess.run([sys.executable, "stages/split.py", params, "a.parquet", "b.parquet"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {params}: split.scheme: got 'halves'; allowed: 'third' or 'kfold'"


def test_manifest_with_escaping_path_is_rejected_on_read(tmp_path):
    import pyarrow.parquet as pq

    root = _mvtec(tmp_path / "ds")
    out = tmp_path / "source.parquet"
    assert _cli("ingest", "--layout", "mvtec", "--root", root, "--out", out, "--params", tmp_path / "none.yaml").returncode == 0
    t = pq.read_table(out)
    paths = t.column("image_path").to_pylist()
    paths[0] = "../../etc/passwd"
    import pyarrow as pa

    t = t.set_column(t.schema.get_field_index("image_path"), t.schema.field("image_path"), pa.array(paths))
    pq.write_table(t, tmp_path / "evil.parquet")
    r = _cli("validate", tmp_path / "evil.parquet")
    assert r.returncode == 2 and "escapes the dataset root" in _error_line(r.stderr)


def test_a_missing_argument_is_one_usage_line_exit_2():
    r = _cli("validate")
    assert r.returncode == 2 and r.stdout == ""
    line = _error_line(r.stderr)
    assert r.stderr.strip() == line and "MANIFEST" in line and "defectforge validate" in line and "--help" in line
    r = _cli("validate", "--no-such-option", "x")
    assert r.returncode == 2 and "--no-such-option" in _error_line(r.stderr)


def test_list_versions_never_cuts_a_value_and_fits_120_columns(monkeypatch):
    import re

    from defectforge.publish import versions

    methods = ["blended", "copy-paste", "cutpaste", "inversion", "perlin", "real-only"]
    metrics = {f"{m}.image_auroc [protocol mixed, budget steps]": 0.912345 for m in methods}
    metrics |= {f"realism.{m}.c2st_accuracy": 0.61 for m in methods[:-1]} | {"qc_pass_rate": 0.9833}
    metrics |= {"detector.brick.learned": True, "detector.brick.copy-paste.pixel_ap": "helps (Δ +0.1)"}  # not numbers: not listed
    row = {"tag": "dataset/sample/v2", "name": "sample", "version": 2, "samples": 12, "content_hash": "0123456789ab",
           "published_at": "2026-12-08T00:00:00+00:00", "metrics": metrics}
    monkeypatch.setattr(versions, "list_versions", lambda repo, name=None: [row, {**row, "tag": "dataset/sample/v3", "version": 3}])
    r = _cli("list-versions")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and max(map(len, lines)) <= 120
    numeric = {f"{k.split(' [')[0]}={v:.3g}" for k, v in metrics.items() if isinstance(v, float)}
    for tag in ("v2", "v3"):
        i = next(i for i, line in enumerate(lines) if line.startswith(f"dataset/sample/{tag} ") and "12 samples" in line)
        shown = [item for line in lines[i + 1:i + 3] for item in line.strip().split(", ")]
        more = re.fullmatch(rf"\+(\d+) more in releases/sample/{tag}\.json", shown[-1])
        assert more, shown
        # every item is a whole key=value (none cut mid-value), and shown + counted = all numeric metrics
        assert set(shown[:-1]) <= numeric and len(shown) - 1 + int(more.group(1)) == len(numeric)


def _cli_subprocess(repo, *args):
    """The ``defectforge`` command as a user runs it: a fresh process in the project folder."""
    r = subprocess.run([sys.executable, "-m", "defectforge.cli", *map(str, args)], cwd=repo, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    assert r.returncode == 0, r.stderr
    return r


def test_the_command_line_and_the_dag_write_the_same_bytes(reproduced, tmp_path):
    """The stage scripts DVC runs and the ``defectforge`` subcommands are one entry per stage: the
    same params, the same threads and kernels, the same bytes (the detector's metrics included)."""
    repo = reproduced.copy(tmp_path)
    d = repo / "data"
    # outputs beside the DAG's (a manifest records its dataset root relative to its own folder)
    _cli_subprocess(repo, "split", "--source", d / "manifests/source.parquet", "--out", d / "manifests/split-cli.parquet")
    assert (d / "manifests/split-cli.parquet").read_bytes() == (d / "manifests/split.parquet").read_bytes()
    _cli_subprocess(repo, "detector", "--split", d / "manifests/split.parquet", "--refined", d / "refined/manifest.parquet",
                    "--qc", d / "quality/qc.parquet", "--out", d / "detector-cli")
    for f in ("details.json", "metrics.json"):
        assert (d / "detector-cli" / f).read_bytes() == (d / "detector" / f).read_bytes(), f


def test_a_params_key_is_overridden_on_the_command_line_as_dvc_does(reproduced, tmp_path):
    import yaml

    repo = reproduced.copy(tmp_path)
    source = repo / "data/manifests/source.parquet"
    _cli_subprocess(repo, "split", "--source", source, "--out", repo / "data/manifests/cli.parquet", "-S", "split.scheme=kfold",
                    "--set", "split.fold=1")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["split"].update(scheme="kfold", fold=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run([sys.executable, "stages/split.py", tmp_path / "params.yaml", source, repo / "data/manifests/dag.parquet"],
                       cwd=repo, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cli, dag = (repo / "data/manifests/cli.parquet").read_bytes(), (repo / "data/manifests/dag.parquet").read_bytes()
    assert cli == dag and cli != (repo / "data/manifests/split.parquet").read_bytes()


@pytest.mark.parametrize("assignment,words", [("split.seed", "expected KEY=VALUE"), ("split.seed=[1", "not valid YAML"),
                                              ("split.seed=x", "split.seed"), ("split.scheme.x=1", "split.scheme is not a section")])
def test_a_bad_override_is_one_line(tmp_path, assignment, words):
    (tmp_path / "p.yaml").write_text("split:\n  scheme: third\n")
    r = _cli("split", "--source", tmp_path / "s.parquet", "--out", tmp_path / "o.parquet", "--params", tmp_path / "p.yaml",
             "-S", assignment)
    assert r.returncode == 2 and r.stderr.count("\n") <= 2 and words in r.stderr, r.stderr


def test_a_missing_params_file_means_the_defaults_for_every_stage_and_a_folder_is_refused(tmp_path):
    r = _cli("split", "--source", tmp_path / "s.parquet", "--out", tmp_path / "o.parquet", "--params", tmp_path / "none.yaml")
    assert "note: no " in r.stderr and "params file not found" not in r.stderr  # the defaults, then the missing source
    (tmp_path / "dir.yaml").mkdir()
    r = _cli("split", "--source", tmp_path / "s.parquet", "--out", tmp_path / "o.parquet", "--params", tmp_path / "dir.yaml")
    assert r.returncode == 2 and "is a folder, not a params file" in r.stderr

"""`dvc repro` end to end in a temporary git repository; metrics and plots through DVC."""

import sys

import pytest
import yaml

STAGES = ("sample", "ingest", "split", "generate", "refine", "quality", "detector", "release")


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_and_second_repro_does_nothing(tmp_path, make_project, run_cmd):
    repo = make_project(tmp_path, remote=False)
    dvc = [sys.executable, "-m", "dvc"]
    out = run_cmd(dvc + ["repro"], repo)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    release = repo / "data/release"
    for name in ("manifest.parquet", "README.md", "report.html", "metrics.json", "release.json"):
        assert (release / name).is_file(), name
    assert "report.html" in (release / "README.md").read_text()
    assert (repo / "dvc.lock").is_file()
    # metrics and plots are DVC's
    shown = run_cmd(dvc + ["metrics", "show"], repo)
    assert "data/detector/metrics.json" in shown and "real-only" in shown and "image_auroc" in shown
    plots = run_cmd(dvc + ["plots", "show", "--json"], repo)
    assert "curves.csv" in plots
    # nothing changed: nothing runs
    again = run_cmd(dvc + ["repro"], repo)
    assert "Running stage" not in again
    # a params change reruns only what depends on it
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["detector"]["seed"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_cmd(dvc + ["repro"], repo)
    assert "Running stage 'detector'" in third
    assert "Running stage 'generate'" not in third and "Running stage 'quality'" not in third

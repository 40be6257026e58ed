"""`dvc repro` end to end in a temporary git repository; metrics and plots through DVC."""

import sys

import pytest
import yaml

STAGES = ("sample", "ingest", "split", "generate", "refine", "quality", "detector", "release")


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_and_second_repro_does_nothing(tmp_path, reproduced, run_cmd):
    out = reproduced.output  # the session's one `dvc repro` of this DAG
    repo = reproduced.copy(tmp_path)
    dvc = [sys.executable, "-m", "dvc"]
    for stage in STAGES:
        assert f"Running stage '{stage}'" in out
    release = repo / "data/release"
    for name in ("manifest.parquet", "README.md", "report.html", "metrics.json", "release.json"):
        assert (release / name).is_file(), name
    assert "report.html" in (release / "README.md").read_text()
    assert (repo / "dvc.lock").is_file()
    # metrics and plots are DVC's
    shown = run_cmd(dvc + ["metrics", "show"], repo)
    assert "data/detector/metrics.json" in shown and "learned" in shown and "copy-paste" in shown and "pass_rate" in shown
    assert max(len(line) for line in shown.splitlines()) <= 120
    plots = run_cmd(dvc + ["plots", "show", "--json"], repo)
    assert "curves.csv" in plots and "delta_pixel_ap.csv" in plots
    # nothing changed: nothing runs
    again = run_cmd(dvc + ["repro"], repo)
    assert "Running stage" not in again
    # a params change reruns only what depends on it
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["detector"]["seeds"] = [1]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = run_cmd(dvc + ["repro"], repo)
    assert "Running stage 'detector'" in third
    assert "Running stage 'generate'" not in third and "Running stage 'quality'" not in third


@pytest.mark.slow
@pytest.mark.nightly
def test_dvc_repro_with_the_diffusion_methods(tmp_path, reproduced, run_cmd):
    """pretrain -> finetune -> generate with inversion and blended (tiny budgets) -> refine -> release.

    On a copy of the reproduced copy-paste project: switching the methods reruns from
    pretrain on, and leaves sample, ingest and split alone (their deps did not change).
    """
    from defectforge.manifest.io import read_manifest
    from defectforge.manifest.validate import validate_manifest

    # 2 training steps paint noise: the realism gates rightly fail it (tested in test_evaluate); here the DAG's plumbing is tested
    no_set_gates = {"min_pass_rate": None, "kid_max": None, "saturated_samples_max": None, "colour_drift_samples_max": None}
    repo = reproduced.copy(tmp_path)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["generate"].update(methods=["inversion", "blended"], n_per_defect=1)
    params["quality"]["set_gates"] = no_set_gates
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = run_cmd([sys.executable, "-m", "dvc", "repro"], repo)
    assert "Running stage 'pretrain'" in out and "Running stage 'finetune'" in out
    assert not any(f"Running stage '{s}'" in out for s in ("sample", "ingest", "split"))
    assert (repo / "data/models/base/model/unet/config.json").is_file()
    ckpts = yaml.safe_load((repo / "data/models/finetune/checkpoints.json").read_text())
    assert sorted(ckpts) == ["brick/crack", "brick/hole", "gravel/scratch", "gravel/stain"]
    release = repo / "data/release/manifest.parquet"
    assert validate_manifest(release) == []
    df = read_manifest(release).to_pandas()
    assert sorted(df.method.unique()) == ["blended", "inversion"] and len(df) == 8
    assert df.attention_path.notna().all()  # both diffusion methods save the defect tokens' attention
    assert set(df.mask_source) <= {"attention", "difference", "raw-fallback"}
    assert df.checkpoint_sha256.notna().all() and df.checkpoint_sha256.str.len().eq(64).all()

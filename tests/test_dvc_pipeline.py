"""`dvc repro` end to end in a temporary git repository, and dvc.yaml in step with Layout."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from defectforge.layout import Layout

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_outs_match_layout():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, path in Layout(Path(".")).outs().items():
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stages[name]["outs"]]
        assert outs == [path.as_posix()], name
        assert path.as_posix() in stages[name]["cmd"]


def _run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_and_second_repro_does_nothing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for item in ("dvc.yaml", "stages", "src"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"].update(size=64, n_train_good=6, n_test_good=3, n_defect=6)
    params["generate"].update(n_per_defect=2, shard_size=2)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)
    _run(dvc + ["config", "core.analytics", "false"], repo, env)
    out = _run(dvc + ["repro"], repo, env)
    for stage in ("sample", "ingest", "split", "generate", "release"):
        assert f"Running stage '{stage}'" in out
    release = repo / "data/release/manifest.parquet"
    assert release.is_file() and (repo / "data/release/README.md").is_file()
    assert (repo / "dvc.lock").is_file()
    again = _run(dvc + ["repro"], repo, env)
    assert "Running stage" not in again
    # a params change reruns only what depends on it
    params["generate"]["n_per_defect"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    third = _run(dvc + ["repro"], repo, env)
    assert "Running stage 'generate'" in third and "Running stage 'ingest'" not in third

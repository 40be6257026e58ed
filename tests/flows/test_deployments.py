"""prefect.yaml declares real deployments of the regeneration flow."""

import os
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_deployments_point_at_the_flow_with_a_schedule_and_the_gpu_pool():
    from flows.regenerate import regenerate
    from defectforge.params.file import parse_params

    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for d in spec["deployments"]:
        # what a worker does first: load the entrypoint from the checkout
        flow = load_flow_from_entrypoint(str(ROOT / d["entrypoint"].split(":")[0]) + ":" + d["entrypoint"].split(":")[1])
        assert flow.name == regenerate.name and set(flow.parameters.properties) == set(regenerate.parameters.properties)
        assert d["work_pool"]["name"] == "gpu"
        assert d["schedules"][0]["cron"].count(" ") == 4
        # the parameters are ones the flow accepts, and overrides are valid params keys
        assert set(d["parameters"]) <= set(regenerate.parameters.properties)
        data = {}
        for key, value in d["parameters"]["params"].items():
            section, field = key.split(".")
            data.setdefault(section, {})[field] = value
        parse_params(data, "prefect.yaml")


def _deployments():
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def test_each_deployment_sets_the_profile_it_claims():
    """The overrides on top of the real params.yaml, as the flow applies them."""
    from defectforge.params.file import parse_params
    from defectforge.orchestrate import override_params

    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    weekly = parse_params(override_params(base, _deployments()["weekly-magnetic-tile"]["parameters"]["params"]))
    assert weekly.pretrain.profile == "pretrained" and weekly.pretrain.base
    assert weekly.data.layout == "magnetic-tile"
    for d in _deployments().values():
        p = parse_params(override_params(base, d["parameters"]["params"]))
        assert ("pretrained profile" in d["description"]) == (p.pretrain.profile == "pretrained"), d["name"]


def _dvc_project(tmp_path, cmd):
    """A one-stage git + DVC project whose stage runs ``cmd``."""
    import subprocess

    repo = tmp_path / "proj"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"talk": {"cmd": cmd, "outs": ["out.txt"]}}}))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for c in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(c, cwd=repo, check=True, env=env)
    return repo


def _fake_venv(repo, log):
    """``repo/.venv/bin/python``: records each call, then runs this interpreter."""
    bin_ = repo / ".venv" / "bin"
    bin_.mkdir(parents=True)
    (repo / ".venv" / "pyvenv.cfg").write_text("home = /usr/bin\n")
    py = bin_ / "python"
    py.write_text(f'#!/bin/sh\necho "$@" >> {log}\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return py


def test_stage_work_runs_with_the_checkouts_venv_and_streams_each_line(tmp_path):
    from defectforge import orchestrate

    stage = "python -c \"import time; print('first line'); time.sleep(2); print('second line'); open('out.txt','w').write('x')\""
    repo = _dvc_project(tmp_path, stage)
    calls = tmp_path / "calls.log"
    py = _fake_venv(repo, calls)
    assert orchestrate.project_python(repo) == py
    seen = []
    orchestrate.repro_stage(repo, "talk", log=lambda line: seen.append((time.monotonic(), line)))
    lines = [line for _, line in seen]
    # dvc itself and the stage's `python` were the checkout's interpreter (the stage through PATH)
    logged = calls.read_text().splitlines()
    assert logged[0].startswith("-m dvc repro -s talk")
    assert any("first line" in c for c in logged[1:])
    # every line reached the log, the first one while the stage was still running
    first = next(t for t, line in seen if line == "first line")
    second = next(t for t, line in seen if line == "second line")
    assert second - first > 1.5, lines
    assert any("Running stage 'talk'" in line for line in lines)


def test_pull_step_makes_the_venv_the_flow_uses(tmp_path):
    """prefect.yaml's pull step runs flows/worker_env.sh in the clone: with DEFECTFORGE_VENV it links
    that venv as .venv (no make install), which is what the stages then run with."""
    import subprocess

    from defectforge import orchestrate

    steps = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]
    script = steps[-1]["prefect.deployments.steps.run_shell_script"]
    assert script["directory"] == "{{ clone.directory }}" and script["script"] == "sh flows/worker_env.sh"
    clone = tmp_path / "clone"
    clone.mkdir()
    venv = Path(sys.executable).parent.parent
    r = subprocess.run(["sh", str(ROOT / "flows/worker_env.sh")], cwd=clone, env={**os.environ, "DEFECTFORGE_VENV": str(venv)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (clone / ".venv").resolve() == venv.resolve()
    assert orchestrate.project_python(clone) == clone / ".venv/bin/python"
    # a bad DEFECTFORGE_VENV: one line, exit 2; a real .venv folder is never replaced
    r = subprocess.run(["sh", str(ROOT / "flows/worker_env.sh")], cwd=clone, env={**os.environ, "DEFECTFORGE_VENV": str(tmp_path / "nope")}, capture_output=True, text=True)
    assert r.returncode == 2 and "nope" in r.stderr
    other = tmp_path / "other"
    (other / ".venv").mkdir(parents=True)
    r = subprocess.run(["sh", str(ROOT / "flows/worker_env.sh")], cwd=other, env={**os.environ, "DEFECTFORGE_VENV": str(venv)}, capture_output=True, text=True)
    assert r.returncode == 2 and "not a link" in r.stderr and (other / ".venv").is_dir() and not (other / ".venv").is_symlink()


def test_push_needs_both_remotes_before_anything_is_published(tmp_path, run_cmd):
    from defectforge import orchestrate
    from defectforge.errors import DefectforgeError

    repo = _dvc_project(tmp_path, "true")
    with pytest.raises(DefectforgeError, match="push=true but the checkout has no git remote"):
        orchestrate.publish_and_push(repo, "sample", push=True)
    run_cmd(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], tmp_path)
    run_cmd(["git", "remote", "add", "origin", (tmp_path / "origin.git").as_uri()], repo)
    with pytest.raises(DefectforgeError, match=r"\.dvc/config: push=true but no DVC remote is configured"):
        orchestrate.publish_and_push(repo, "sample", push=True)
    assert run_cmd(["git", "tag"], repo).strip() == ""
    run_cmd([sys.executable, "-m", "dvc", "remote", "add", "-d", "local", str(tmp_path / "dvcremote")], repo)
    assert orchestrate.check_push_targets(repo) == "origin"


def test_publish_subprocess_reports_bad_input_as_a_stage_failure(tmp_path):
    """Publishing runs in the project's interpreter; its one-line error is not retried."""
    from defectforge import orchestrate

    repo = _dvc_project(tmp_path, "true")
    with pytest.raises(orchestrate.StageFailed, match="publish: .*release.json: no release to publish"):
        orchestrate.publish(repo, "sample", push=False)

"""The regeneration flow against a real temporary Prefect server (prefect_test_harness)."""

import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def no_retry_wait(monkeypatch):
    """The retries are real; only their 2 s / 10 s back-off is not waited for in tests."""
    import flows.regenerate as module

    for name in ("sync_inputs", "repro_stage", "publish"):
        monkeypatch.setattr(module, name, getattr(module, name).with_options(retry_delay_seconds=0))


def test_flow_runs_dag_retries_a_transient_failure_and_publishes(prefect_server, tmp_path, reproduced, run_cmd, monkeypatch):
    from defectforge import orchestrate
    from defectforge.manifest.validate import validate_manifest
    from flows.regenerate import regenerate

    repo = reproduced.copy(tmp_path)  # the stages the flow runs are up to date or rerun as params say
    real = orchestrate.repro_stage
    calls = []

    def flaky(repo_, stage, log=None):
        calls.append(stage)
        if stage == "split" and calls.count("split") == 1:
            raise orchestrate.TransientStageError("worker lost")
        return real(repo_, stage, log=log)

    monkeypatch.setattr(orchestrate, "repro_stage", flaky)
    remote = tmp_path / "origin.git"
    run_cmd(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    run_cmd(["git", "remote", "add", "origin", remote.as_uri()], repo)
    state = regenerate(str(repo), return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert calls.count("split") == 2  # retried once, then succeeded
    assert calls == ["sample", "ingest", "split", "split", "pretrain", "finetune", "generate", "refine", "quality", "detector", "release"]
    assert result["published"] == {"tag": "dataset/sample/v1", "version": 1, "created": True, "pushed": True}
    assert "refs/tags/dataset/sample/v1" in run_cmd(["git", "ls-remote", "--tags", remote.as_uri()], tmp_path)
    assert result["summary"]["samples"] == 8
    assert validate_manifest(repo / "releases/sample/v1/manifest.parquet") == []
    assert "dataset/sample/v1" in run_cmd(["git", "tag"], repo)
    # the run's artifact exists on the server
    from prefect.artifacts import Artifact

    art = Artifact.get("defectforge-run")
    assert art is not None and "dataset/sample/v1" in art.data and "| brick | crack | copy-paste | 2 |" in art.data
    assert "releases/sample/v1/report.html" in art.data
    link = Artifact.get("defectforge-report")
    assert link is not None and "releases/sample/v1/report.html" in link.data


def test_bad_input_fails_the_run_without_retries_and_publishes_nothing(prefect_server, tmp_path, reproduced, run_cmd, monkeypatch):
    from defectforge import orchestrate
    from flows.regenerate import regenerate

    repo = reproduced.copy(tmp_path)  # the stages the flow runs are up to date or rerun as params say
    calls = []
    real = orchestrate.repro_stage
    monkeypatch.setattr(orchestrate, "repro_stage", lambda r, s, log=None: (calls.append(s), real(r, s, log=log))[1])
    empty = tmp_path / "empty"
    empty.mkdir()
    state = regenerate(str(repo), params={"data.layout": "folder", "data.root": str(empty)}, push=False, return_state=True)
    assert state.is_failed()
    assert calls == ["sample", "ingest"]  # not retried
    with pytest.raises(orchestrate.StageFailed, match=f"stage ingest: .*{empty.name}"):
        state.result()
    assert run_cmd(["git", "tag"], repo).strip() == ""


def test_params_overrides_are_validated(prefect_server, tmp_path, reproduced):
    from flows.regenerate import regenerate

    repo = reproduced.copy(tmp_path)  # the stages the flow runs are up to date or rerun as params say
    state = regenerate(str(repo), params={"split.scheme": "halves"}, push=False, return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="split.scheme"):
        state.result()


def test_failed_quality_gate_stops_the_release(prefect_server, tmp_path, reproduced, run_cmd, monkeypatch):
    from defectforge import orchestrate
    from flows.regenerate import regenerate

    repo = reproduced.copy(tmp_path)  # the stages the flow runs are up to date or rerun as params say
    calls = []
    real = orchestrate.repro_stage
    monkeypatch.setattr(orchestrate, "repro_stage", lambda r, s, log=None: (calls.append(s), real(r, s, log=log))[1])
    # KID can never be below -1: the set-level gate must fail
    state = regenerate(str(repo), params={"quality.set_gates": {"kid_max": -1.0, "min_pass_rate": 0.5}}, push=False, return_state=True)
    assert state.is_failed()
    assert calls == ["sample", "ingest", "split", "pretrain", "finetune", "generate", "refine", "quality"]  # failed once, not retried
    with pytest.raises(orchestrate.StageFailed, match=r"stage quality: quality gate failed .*kid_mean .* > -1\.0"):
        state.result()
    assert run_cmd(["git", "tag"], repo).strip() == ""
    assert not (repo / "releases").exists()


def test_push_without_a_dvc_remote_fails_before_any_stage(prefect_server, tmp_path, reproduced, run_cmd, monkeypatch):
    from defectforge import orchestrate
    from flows.regenerate import regenerate

    repo = reproduced.copy(tmp_path)
    remote = tmp_path / "origin.git"
    run_cmd(["git", "init", "-q", "--bare", str(remote)], tmp_path)
    run_cmd(["git", "remote", "add", "origin", remote.as_uri()], repo)
    run_cmd([sys.executable, "-m", "dvc", "remote", "remove", "local"], repo)
    calls = []
    monkeypatch.setattr(orchestrate, "repro_stage", lambda r, s, log=None: calls.append(s))
    state = regenerate(str(repo), return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=r"\.dvc/config: push=true but no DVC remote is configured"):
        state.result()
    assert calls == [] and run_cmd(["git", "tag"], repo).strip() == ""

"""A real worker: a temporary Prefect server, a process worker of the `gpu` pool, the real
prefect.yaml deployed from a git repository (a bare file:// remote, cloned shallow by the
pull step), one deployment run to completion; and ``defectforge doctor``."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- defectforge doctor -------------------------------------------------------------------

@pytest.fixture
def health_server():
    """A stand-in Prefect API answering /api/health."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path.endswith("/health") else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_port}/api"
    srv.shutdown()


def _git_repo(tmp_path, run_cmd) -> Path:
    repo = tmp_path / "checkout"
    repo.mkdir()
    run_cmd(["git", "init", "-q"], repo)
    run_cmd([sys.executable, "-m", "dvc", "init", "-q"], repo)
    return repo


def _doctor(repo, monkeypatch, path: str, api_url: str | None):
    from defectforge import doctor

    monkeypatch.setenv("PATH", path)
    lines: list[str] = []
    rc = doctor.run(repo, out=lines.append, api_url=api_url)
    return rc, {line.split(":", 1)[0]: line for line in lines}


def test_doctor_passes_with_remotes_venv_on_path_and_an_api(tmp_path, run_cmd, monkeypatch, health_server):
    repo = _git_repo(tmp_path, run_cmd)
    run_cmd(["git", "init", "-q", "--bare", str(tmp_path / "origin.git")], tmp_path)
    run_cmd(["git", "remote", "add", "origin", (tmp_path / "origin.git").as_uri()], repo)
    # a path longer than a terminal line: `dvc remote list` wraps it (the doctor misread that)
    store = tmp_path / ("store-" + "x" * 100)
    run_cmd([sys.executable, "-m", "dvc", "remote", "add", "-d", "store", str(store)], repo)
    # not committed yet: a published tag would not say where its data is
    rc, lines = _doctor(repo, monkeypatch, f"{BIN}{os.pathsep}{os.environ['PATH']}", health_server)
    assert rc == 2 and "the committed .dvc/config (git show HEAD:.dvc/config) has no default remote" in lines["dvc remote"]
    run_cmd(["git", "commit", "-qm", "dvc remote", "--", ".dvc/config"], repo)
    rc, lines = _doctor(repo, monkeypatch, f"{BIN}{os.pathsep}{os.environ['PATH']}", health_server)
    assert rc == 0, lines
    assert lines["path"] == f"path: ok (dvc, prefect, defectforge from {BIN})"
    assert lines["git remote"].startswith("git remote: ok (origin file://") and "reachable" in lines["git remote"]
    assert lines["dvc remote"] == f"dvc remote: ok (store {store} (default) (committed))"
    assert lines["python"].startswith("python: ok (worker 3.")
    assert lines["prefect api"] == f"prefect api: ok ({health_server} reachable)"
    assert lines["gpu"].startswith("gpu: ") and "FAIL" not in lines["gpu"]  # information, never a failure
    assert len(lines) == 7 and all(": ok" in line or key == "gpu" for key, line in lines.items())


def test_doctor_names_each_missing_piece_and_exits_2(tmp_path, run_cmd, monkeypatch):
    from defectforge.cli import main

    repo = _git_repo(tmp_path, run_cmd)
    # a stray dvc earlier on PATH than the venv's
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "dvc").write_text("#!/bin/sh\nexit 0\n")
    (stray / "dvc").chmod(0o755)
    rc, lines = _doctor(repo, monkeypatch, f"{stray}{os.pathsep}{BIN}{os.pathsep}/usr/bin:/bin", f"http://127.0.0.1:{_free_port()}/api")
    assert rc == 2
    assert lines["path"].startswith("path: FAIL: not one venv: dvc from " + str(stray))
    assert lines["git remote"] == f"git remote: FAIL: {repo} has no git remote: published versions could not be pushed (git remote add origin URL)"
    assert lines["dvc remote"].startswith(f"dvc remote: FAIL: {repo / '.dvc/config'}: no DVC remote configured")
    assert lines["prefect api"].startswith("prefect api: FAIL: http://127.0.0.1:") and "not reachable" in lines["prefect api"]
    # a remote that is configured but does not answer; no API URL at all
    run_cmd(["git", "remote", "add", "origin", (tmp_path / "gone.git").as_uri()], repo)
    rc, lines = _doctor(repo, monkeypatch, f"{BIN}{os.pathsep}/usr/bin:/bin", None)
    assert rc == 2 and lines["path"].startswith("path: ok")
    assert lines["git remote"].startswith("git remote: FAIL: origin (file://") and "not reachable" in lines["git remote"]
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(tmp_path / "profiles.toml"))
    # the command line: same lines, exit status 2
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as exc:
        main(["doctor"])
    assert exc.value.code == 2


def test_doctor_compares_the_worker_python_with_the_venv(tmp_path, run_cmd):
    from defectforge import doctor

    repo = _git_repo(tmp_path, run_cmd)
    other = tmp_path / "python"
    other.write_text("#!/bin/sh\necho 2.7.18\n")  # a worker started with another interpreter
    other.chmod(0o755)
    check = doctor.check_python(repo, worker_python=str(other))
    assert not check.ok and check.line().startswith(f"python: FAIL: worker Python {other} is 2.7.18, the project venv's ")
    assert doctor.check_python(repo, worker_python=sys.executable).ok


# --- a real worker ----------------------------------------------------------------------------

def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"prefect server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"prefect server did not answer in {timeout} s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.nightly
@pytest.mark.timeout(1500)
def test_a_process_worker_runs_the_deployment_and_the_tags_reach_the_remote(tmp_path, make_project, run_cmd):
    # the project, as a worker would clone it: cheap params (the copy-paste DAG), a local DVC remote,
    # the real flows/ and prefect.yaml, branch main, pushed to a bare file:// remote
    repo = make_project(tmp_path)
    shutil.copytree(ROOT / "flows", repo / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("prefect.yaml", "pyproject.toml", "Makefile"):
        shutil.copy(ROOT / f, repo / f)
    run_cmd(["git", "add", "flows", "prefect.yaml", "pyproject.toml", "Makefile"], repo)
    run_cmd(["git", "commit", "-qm", "flows and deployments"], repo)
    run_cmd(["git", "branch", "-M", "main"], repo)
    origin = tmp_path / "origin.git"
    run_cmd(["git", "init", "-q", "--bare", str(origin)], tmp_path)
    run_cmd(["git", "push", "-q", origin.as_uri(), "main"], repo)

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("PYTHONPATH", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def start(name: str, cmd: list[str], **extra) -> subprocess.Popen:
        out = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=tmp_path, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def prefect(*args: str, cwd: Path = tmp_path, timeout: float = 300, **extra) -> str:
        r = subprocess.run([str(BIN / "prefect"), *args], cwd=cwd, env={**env, **extra}, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"prefect {' '.join(args)}: {r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r.stdout + r.stderr

    t0 = time.monotonic()
    try:
        server = start("server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)])
        _wait_health(api, server, logs / "server.log")
        prefect("work-pool", "create", "gpu", "--type", "process")
        # the git URL is known only to the deploying shell, as in the README
        prefect("--no-prompt", "deploy", "--name", "nightly-sample", cwd=repo, DEFECTFORGE_GIT_URL=origin.as_uri())
        # the worker: this venv stands in for the `make install` of each clone (DEFECTFORGE_VENV)
        start("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "gpu"], DEFECTFORGE_VENV=sys.prefix)

        versions = []
        for run, overrides in enumerate([None, '{"generate.n_per_defect": 1}']):
            args = ["deployment", "run", "defectforge-regenerate/nightly-sample", "--watch", "--watch-timeout", "900"]
            if overrides:
                args += ["--param", f"params={overrides}"]
            out = prefect(*args, timeout=960)
            assert "Completed" in out, out
            flow_run = re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)
            log = prefect("flow-run", "logs", flow_run)
            # stage work ran with the clone's .venv, and each stage's output reached the run's log
            assert re.search(r"stage work: \S+/\.venv/bin/python", log), log[-3000:]
            assert "Running stage 'generate'" in log and "project environment: .venv -> " in (logs / "worker.log").read_text() + log
            versions.append(re.findall(r"dataset/sample/v(\d+)", log))
        remote_tags = run_cmd(["git", "ls-remote", "--tags", origin.as_uri()], tmp_path)
        # every run is a fresh shallow clone: numbering continues from the remote's tags
        assert "refs/tags/dataset/sample/v1" in remote_tags and "refs/tags/dataset/sample/v2" in remote_tags, remote_tags
        assert "2" in versions[1] and "2" not in versions[0]
        head = run_cmd(["git", "log", "--oneline", "-1", "main"], origin)
        assert "Release dataset sample/v2" in head
        print(f"\nreal worker: 2 runs in {time.monotonic() - t0:.0f} s")
    finally:
        for p in reversed(procs):
            _stop(p)

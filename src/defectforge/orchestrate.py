"""What the Prefect flows call: run the DVC DAG stage by stage, check gates, publish, summarise.

The scheduled flow runs the *DVC* pipeline (``dvc repro -s <stage>`` in DAG order)
rather than calling stage code itself, so a scheduled run records ``dvc.lock`` exactly
as a manual ``dvc repro`` would, and a release can commit it. A stage that stops on
bad input or on a failed quality gate prints one ``error: ...`` line and exits 2:
that is a :class:`StageFailed` (never retried). Anything else (a killed worker, a
full disk, a CUDA hiccup) is a :class:`TransientStageError`, which Prefect retries.

**The project's own environment.** A Prefect process worker runs the flow in *its*
Python. Every piece of stage work (``dvc``, the stage scripts, publishing) therefore
runs as a subprocess of the checkout's ``.venv/bin/python`` (what the deployment's pull
step built, see :func:`project_python`), with that ``bin`` first on ``PATH`` (so
``dvc.yaml``'s ``python stages/...`` is the project's interpreter) and the checkout's
``src`` on ``PYTHONPATH``. Their output goes to the ``log`` callable line by line (the
flow passes the Prefect run logger: long stages show progress in the UI).

**Publishing pushes.** :func:`publish` fetches the remote's tags first (so numbering
continues where the last run, on any worker, stopped), publishes with
:func:`defectforge.publish.versions.publish` (``dvc push``, then ``git push`` of the
release commit and its tag), and checks that the tag is on the git remote. With ``push``
a missing git or DVC remote is an error before anything runs, never a silent skip.

    python -m defectforge.orchestrate publish REPO NAME [--no-push]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from defectforge.errors import DefectforgeError, ParamsError
from defectforge.params.file import parse_params

Log = Callable[[str], Any]
PUBLISHED_MARK = "defectforge-published "
GIT_TIMEOUT = 120


class StageFailed(DefectforgeError):
    """A stage refused its input or a quality gate failed: rerunning cannot help."""


class TransientStageError(RuntimeError):
    """A stage crashed for a reason outside its input: worth a retry."""


class PushFailed(RuntimeError):
    """``git push`` / ``dvc push`` failed (network, remote moved on): worth a retry."""


def project_python(repo: str | os.PathLike) -> Path:
    """The project's interpreter: ``<repo>/.venv/bin/python`` when the checkout has one
    (the deployment's pull step makes it), else the running one (a developer's venv)."""
    venv = Path(os.path.abspath(repo)) / ".venv" / "bin" / "python"
    return venv if venv.is_file() and os.access(venv, os.X_OK) else Path(sys.executable)


def _env(repo: str | os.PathLike = ".") -> dict[str, str]:
    python = project_python(repo)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", "GIT_TERMINAL_PROMPT": "0"}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    src = Path(os.path.abspath(repo)) / "src"
    # the checkout's code, not whatever the worker's PYTHONPATH pointed at
    if (src / "defectforge").is_dir():
        env["PYTHONPATH"] = str(src)
    else:
        env.pop("PYTHONPATH", None)
    if python.parent.parent.joinpath("pyvenv.cfg").is_file():
        env["VIRTUAL_ENV"] = str(python.parent.parent)
    return env


def _stream(cmd: list[str], repo: str | os.PathLike, log: Log | None = None) -> tuple[int, list[str]]:
    """Run ``cmd`` in ``repo`` with the project's environment; every output line (stdout
    and stderr, progress bars' carriage returns included) goes to ``log`` as it comes.
    Returns the exit status and the last 400 lines."""
    tail: collections.deque[str] = collections.deque(maxlen=400)
    proc = subprocess.Popen(
        cmd, cwd=Path(repo), env=_env(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", bufsize=1,
    )
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:  # text mode: \r and \n both end a line
            line = line.rstrip()
            if not line:
                continue
            tail.append(line)
            if log is not None:
                log(line)
    return proc.wait(), list(tail)


def _dvc(repo: str | os.PathLike, *args: str) -> list[str]:
    return [str(project_python(repo)), "-m", "dvc", *args]


def dvc_stages(repo: str | os.PathLike) -> list[str]:
    """Stage names of dvc.yaml in file order (which is the DAG order)."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise DefectforgeError(f"{path}: not a defectforge DVC project (no dvc.yaml)")
    return list(yaml.safe_load(path.read_text())["stages"])


def override_params(data: dict[str, Any], overrides: dict[str, Any] | None, source: str = "params.yaml") -> dict[str, Any]:
    """``data`` with dotted keys set (like ``dvc exp run -S``), validated; ``data`` is not changed."""
    import copy

    data = copy.deepcopy(data or {})
    for key, value in (overrides or {}).items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{source}: {key}: no such section {part!r}")
            node = node[part]
        node[parts[-1]] = value
    parse_params(data, source)
    return data


def apply_params(repo: str | os.PathLike, overrides: dict[str, Any] | None) -> None:
    """Set dotted keys in params.yaml (like ``dvc exp run -S``), validated before writing."""
    if not overrides:
        return
    path = Path(repo) / "params.yaml"
    data = override_params(yaml.safe_load(path.read_text()) or {}, overrides, str(path))
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def _dvc_remotes(repo: str | os.PathLike) -> list[str]:
    r = subprocess.run(_dvc(repo, "remote", "list"), cwd=Path(repo), env=_env(repo), capture_output=True, text=True)
    if r.returncode != 0:
        raise TransientStageError(f"dvc remote list failed in {repo}: {(r.stderr or r.stdout).strip()[-300:]}")
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def git_remote(repo: str | os.PathLike) -> str | None:
    """The git remote releases go to: ``origin``, or the only one; None when there is none."""
    r = subprocess.run(["git", "remote"], cwd=Path(repo), capture_output=True, text=True)
    names = r.stdout.split() if r.returncode == 0 else []
    if "origin" in names:
        return "origin"
    if len(names) > 1:
        raise DefectforgeError(f"{repo}: several git remotes ({', '.join(names)}) and none is called origin: say which with `git remote rename`")
    return names[0] if names else None


def check_push_targets(repo: str | os.PathLike) -> str:
    """With ``push``, both remotes must exist: checked before hours of generation, not after."""
    repo = Path(repo)
    remote = git_remote(repo)
    if remote is None:
        raise DefectforgeError(f"{repo}: push=true but the checkout has no git remote: the release commit and tag would vanish with it (add one, or run with push=false)")
    if not _dvc_remotes(repo):
        raise DefectforgeError(f"{repo / '.dvc/config'}: push=true but no DVC remote is configured: the release's images would exist only on this worker (`dvc remote add -d NAME URL`, or run with push=false)")
    return remote


def sync_inputs(repo: str | os.PathLike, log: Log | None = None) -> str:
    """``dvc pull`` when a DVC remote is configured (what is missing is rebuilt by repro)."""
    if not _dvc_remotes(repo):
        return "no DVC remote configured: nothing to pull"
    rc, lines = _stream(_dvc(repo, "pull", "--allow-missing"), repo, log)
    if rc != 0:
        raise TransientStageError(f"dvc pull failed: {' | '.join(lines[-3:])[-400:]}")
    return "pulled inputs from the DVC remote"


def repro_stage(repo: str | os.PathLike, stage: str, log: Log | None = None) -> str:
    """``dvc repro -s STAGE`` in the project's environment, its output streamed to ``log``;
    returns the output's tail. Raises StageFailed / TransientStageError."""
    rc, lines = _stream(_dvc(repo, "repro", "-s", stage), repo, log)
    out = "\n".join(lines)
    if rc == 0:
        return out
    errors = [line[line.find("error: ") :] for line in lines if "error: " in line and not line.startswith("ERROR")]
    if errors:
        raise StageFailed(f"stage {stage}: {errors[0][len('error: '):]}")
    raise TransientStageError(f"stage {stage} crashed: {out.strip()[-600:]}")


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=GIT_TIMEOUT, env=_env(repo))


def publish_and_push(repo: str | os.PathLike, name: str, push: bool = True, log: Log | None = print) -> dict[str, Any]:
    """Publish ``data/release`` as the next version of ``name`` and, with ``push``, send it
    to the remotes (the data first, then the branch and the tag) and check that the tag
    arrived. Runs in the project's environment (see :func:`publish`)."""
    from defectforge.publish import versions

    log = log or (lambda _line: None)
    repo = Path(repo).resolve()
    remote = check_push_targets(repo) if push else git_remote(repo)
    if remote is not None:
        # a worker's checkout is fresh (and shallow): without the remote's tags every run is v1
        r = _git(repo, "fetch", "-q", "--tags", "--force", remote)
        if r.returncode != 0:
            message = f"git fetch --tags {remote} failed in {repo}: {(r.stderr or r.stdout).strip()[-300:]}"
            if push:
                raise PushFailed(message)
            log(f"warning: {message}")
    # versions.publish pushes (dvc push, then git push of the branch and the tag)
    published = versions.publish(repo, name, push=push)
    result = {"tag": published.tag, "version": published.version, "created": published.created, "pushed": False}
    if not push:
        return result
    # loud, never a silent skip: the tag must now be on the remote
    r = _git(repo, "ls-remote", "--tags", remote, f"refs/tags/{published.tag}")
    if r.returncode != 0 or not r.stdout.strip():
        raise PushFailed(f"{published.tag} is not on the git remote {remote} after publishing: {(r.stderr or 'the push did not happen').strip()[-300:]}")
    log(f"{published.tag} is on the git remote {remote}; the data went to the DVC remote")
    return {**result, "pushed": True}


def publish(repo: str | os.PathLike, name: str, push: bool = True, log: Log | None = None) -> dict[str, Any]:
    """:func:`publish_and_push` run by the project's own interpreter (``python -m
    defectforge.orchestrate publish``), its output streamed to ``log``. Bad input or a
    missing remote: :class:`StageFailed`; a crash or a failed push: :class:`TransientStageError`."""
    cmd = [str(project_python(repo)), "-m", "defectforge.orchestrate", "publish", str(Path(repo).resolve()), name, "--push" if push else "--no-push"]
    rc, lines = _stream(cmd, repo, log)
    if rc == 0:
        for line in reversed(lines):
            if line.startswith(PUBLISHED_MARK):
                return json.loads(line[len(PUBLISHED_MARK):])
        raise TransientStageError(f"publish printed no result: {' | '.join(lines[-3:])}")
    errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
    if rc == 2 and errors:
        raise StageFailed(f"publish: {errors[-1]}")
    raise TransientStageError(f"publish failed: {' | '.join(lines[-3:])[-600:]}")


def run_summary(repo: str | os.PathLike) -> dict[str, Any]:
    """Counts and metrics of the current release, for the run's artifacts."""
    repo = Path(repo)
    info = repo / "data/release/release.json"
    summary = json.loads(info.read_text()) if info.is_file() else {}
    return summary


def report_path(repo: str | os.PathLike, published: dict[str, Any] | None = None) -> Path | None:
    """The run's HTML report: the published version's copy, else the release stage's."""
    repo = Path(repo).resolve()
    candidates = []
    if published:
        name, version = published["tag"].split("/")[1], published["version"]
        candidates.append(repo / "releases" / name / f"v{version}" / "report.html")
    candidates.append(repo / "data/release/report.html")
    return next((c for c in candidates if c.is_file()), None)


def summary_markdown(summary: dict[str, Any], published: dict[str, Any] | None = None, report: Path | None = None) -> str:
    lines = [f"# defectforge run: `{summary.get('dataset_version', '?')}`", ""]
    if report is not None:
        lines += [f"[HTML report]({report.as_uri()}) (`{report}`)", ""]
    if published:
        state = "published" if published.get("created") else "unchanged (no new version)"
        lines += [f"**Release:** `{published.get('tag')}` - {state}", ""]
    lines += ["| category | defect type | method | samples |", "| --- | --- | --- | --- |"]
    for c in summary.get("counts", []):
        lines.append(f"| {c['category']} | {c['defect_type']} | {c['method']} | {c['samples']} |")
    metrics = summary.get("metrics") or {}
    if metrics:
        lines += ["", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items()) if not isinstance(v, (dict, list))]
    return "\n".join(lines) + "\n"


def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m defectforge.orchestrate", description="publish (and push) a release, in the project's environment")
    sub = ap.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish")
    pub.add_argument("repo")
    pub.add_argument("name")
    pub.add_argument("--push", action=argparse.BooleanOptionalAction, default=True)
    a = ap.parse_args(argv)
    try:
        result = publish_and_push(a.repo, a.name, a.push, log=lambda line: print(line, flush=True))
    except DefectforgeError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    print(PUBLISHED_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main())

"""``defectforge doctor``: does this machine have what a Prefect worker of the factory needs?

One line per check, ``<check>: ok (...)`` or ``<check>: FAIL: <reason>``; exit status 0
when every required check passes, else 2. The GPU line is information only (without
one, the tiny profile runs on CPU).

- ``path``: ``dvc``, ``prefect`` and ``defectforge`` are on PATH and come from one venv;
- ``git remote``: the checkout has one (releases are pushed there) and it answers
  ``git ls-remote`` within a few seconds;
- ``git identity``: git can commit (a release is a commit);
- ``dvc remote``: one is configured (the release's images are pushed there), and the
  default one is in the committed ``.dvc/config`` (``git show HEAD:.dvc/config``) with an
  absolute path or URL: a consumer of a tag sees only what is committed;
- ``python``: the Python that runs the worker (the one of ``prefect`` on PATH) has the
  version of the project's venv (the flow runs in the first, the stages in the second);
- ``prefect api``: ``PREFECT_API_URL`` is set and its ``/health`` answers;
- ``gpu``: the CUDA device's name, or ``none: tiny profile only``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

TIMEOUT = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    required: bool = True

    def line(self) -> str:
        if self.ok:
            return f"{self.name}: ok ({self.detail})" if self.detail else f"{self.name}: ok"
        return f"{self.name}: FAIL: {self.detail}" if self.required else f"{self.name}: {self.detail}"


def project_bin(repo: Path) -> Path:
    """The project venv's bin: the checkout's ``.venv/bin``, else the running interpreter's."""
    venv = Path(os.path.abspath(repo)) / ".venv" / "bin"
    return venv if (venv / "python").is_file() else Path(sys.executable).parent


def _venv_of(executable: Path) -> Path | None:
    """The venv a console script belongs to: its folder's parent when that holds pyvenv.cfg."""
    root = executable.parent.parent
    return root if (root / "pyvenv.cfg").is_file() else None


def check_path(repo: Path) -> Check:
    found = {name: shutil.which(name) for name in ("dvc", "prefect", "defectforge")}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        return Check("path", False, f"{', '.join(missing)} not on PATH: put the project venv's bin first (export PATH={project_bin(repo)}:$PATH)")
    venvs = {n: _venv_of(Path(p)) for n, p in found.items()}
    if None in venvs.values() or len({v.resolve() for v in venvs.values()}) != 1:
        where = ", ".join(f"{n} from {Path(p).parent}" for n, p in found.items())
        return Check("path", False, f"not one venv: {where}")
    return Check("path", True, f"dvc, prefect, defectforge from {Path(found['dvc']).parent}")


def _run(cmd: list[str], cwd: Path, timeout: float = TIMEOUT) -> subprocess.CompletedProcess | None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=5"), "DVC_NO_ANALYTICS": "1"}
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None


def check_git_remote(repo: Path) -> Check:
    r = _run(["git", "remote"], repo)
    if r is None or r.returncode != 0:
        return Check("git remote", False, f"{repo} is not a git checkout")
    names = r.stdout.split()
    if not names:
        return Check("git remote", False, f"{repo} has no git remote: published versions could not be pushed (git remote add origin URL)")
    name = "origin" if "origin" in names else names[0]
    url = (_run(["git", "remote", "get-url", name], repo) or subprocess.CompletedProcess([], 1, "", "")).stdout.strip()
    r = _run(["git", "ls-remote", "--heads", name], repo)
    if r is None:
        return Check("git remote", False, f"{name} ({url}) did not answer within {TIMEOUT:.0f} s")
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no answer"])[-1]
        return Check("git remote", False, f"{name} ({url}) is not reachable: {last}")
    return Check("git remote", True, f"{name} {url} reachable")


def check_git_identity(repo: Path) -> Check:
    """Publishing commits in the worker's checkout: git must know who commits."""
    r = _run(["git", "var", "GIT_COMMITTER_IDENT"], repo)
    if r is None or r.returncode != 0:
        return Check("git identity", False, "git has no committer name/email: a release commit would fail (git config --global user.name/user.email, or GIT_COMMITTER_NAME/EMAIL in the worker's environment)")
    return Check("git identity", True, r.stdout.rsplit(">", 1)[0] + ">")


def check_dvc_remote(repo: Path) -> Check:
    # `dvc config --list` (one key=value a line), not `dvc remote list`: the latter is a table
    # that DVC wraps at the terminal width, so a long remote path broke its lines
    r = _run([str(project_bin(repo) / "python"), "-m", "dvc", "config", "--list"], repo, timeout=60)
    if r is None or r.returncode != 0:
        detail = "timed out" if r is None else (r.stderr.strip().splitlines() or ["failed"])[-1]
        return Check("dvc remote", False, f"dvc config --list in {repo}: {detail}")
    urls: dict[str, str] = {}
    default = ""
    for line in r.stdout.splitlines():
        key, _, value = line.strip().partition("=")
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "remote" and parts[2] == "url":
            urls[parts[1]] = value
        elif key == "core.remote":
            default = value
    if not urls:
        return Check("dvc remote", False, f"{repo / '.dvc/config'}: no DVC remote configured: a release's images could not be pushed (dvc remote add -d NAME URL)")
    listed = ", ".join(f"{name} {url}" + (" (default)" if name == default else "") for name, url in urls.items())
    if not default:
        return Check("dvc remote", False, f"{listed}: no default remote, so `dvc push` and consumers do not know where the data goes (dvc remote default NAME)")
    # what a consumer of a tag sees: the committed config only
    from defectforge.publish.remotes import committed_default, working_default

    committed = committed_default(repo)
    if committed is None or not committed.url:
        work = working_default(repo)
        fix = ("git add .dvc/config && git commit (defectforge publish also commits it)" if work is not None and work.url
               else "it is in .dvc/config.local or the global config: dvc remote add -d --project NAME URL, then commit .dvc/config")
        return Check("dvc remote", False, f"{listed}; but the committed .dvc/config (git show HEAD:.dvc/config) has no default remote, "
                                          f"so a published tag does not say where its data is: {fix}")
    if not committed.portable:
        return Check("dvc remote", False, f"{listed}; but the committed default remote {committed.name} has the relative URL {committed.url!r}, "
                                          "which each consumer resolves inside its own copy: use an absolute path or URL")
    note = "" if committed.name == default else f"; consumers of a tag use the committed default {committed.name} {committed.url}"
    return Check("dvc remote", True, listed + f" (committed){note}")


def _python_version(python: str) -> str | None:
    r = _run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"], Path.cwd())
    return r.stdout.strip() if r is not None and r.returncode == 0 else None


def _interpreter_of(script: str) -> str | None:
    """The Python a console script runs with (its shebang)."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline().decode(errors="replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    parts = first[2:].split()
    if parts and Path(parts[0]).name == "env" and len(parts) > 1:
        return shutil.which(parts[1])
    return parts[0] if parts else None


def check_python(repo: Path, worker_python: str | None = None) -> Check:
    project = str(project_bin(repo) / "python")
    if worker_python is None:
        prefect = shutil.which("prefect")
        worker_python = _interpreter_of(prefect) if prefect else None
    if worker_python is None:
        return Check("python", False, "no prefect on PATH: cannot tell which Python runs the worker")
    want, have = _python_version(project), _python_version(worker_python)
    if want is None:
        return Check("python", False, f"{project} does not run")
    if have is None:
        return Check("python", False, f"worker Python {worker_python} does not run")
    if want.split(".")[:2] != have.split(".")[:2]:
        return Check("python", False, f"worker Python {worker_python} is {have}, the project venv's {project} is {want}")
    return Check("python", True, f"worker {have} = project venv {want}")


def check_prefect_api(url: str | None = None) -> Check:
    if url is None:
        try:
            from prefect.settings import PREFECT_API_URL

            url = PREFECT_API_URL.value()
        except Exception:  # noqa: BLE001 - prefect missing or a broken profile
            url = os.environ.get("PREFECT_API_URL")
    if not url:
        return Check("prefect api", False, "PREFECT_API_URL is not set: the worker would not find the server (prefect config set PREFECT_API_URL=http://HOST:4200/api)")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            if resp.status != 200:
                return Check("prefect api", False, f"{url}/health answered {resp.status}")
    except Exception as exc:  # noqa: BLE001 - any network failure is the answer
        return Check("prefect api", False, f"{url} is not reachable: {getattr(exc, 'reason', exc)}")
    return Check("prefect api", True, f"{url} reachable")


def check_gpu() -> Check:
    try:
        import torch

        if torch.cuda.is_available():
            return Check("gpu", True, f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})", required=False)
    except Exception as exc:  # noqa: BLE001
        return Check("gpu", False, f"none: tiny profile only (torch: {exc})", required=False)
    return Check("gpu", False, "none: tiny profile only", required=False)


def run(repo: str | os.PathLike = ".", out: Callable[[str], object] = print, worker_python: str | None = None, api_url: str | None = None) -> int:
    """Run every check, print one line each; 0 when the required ones pass, else 2."""
    repo = Path(repo)
    checks = [
        check_path(repo),
        check_git_remote(repo),
        check_git_identity(repo),
        check_dvc_remote(repo),
        check_python(repo, worker_python),
        check_prefect_api(api_url),
        check_gpu(),
    ]
    for c in checks:
        out(c.line())
    return 0 if all(c.ok for c in checks if c.required) else 2

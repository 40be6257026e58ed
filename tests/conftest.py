"""Shared fixtures. Nothing here touches the network: analytics are off before any import."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

_HOME = tempfile.mkdtemp(prefix="defectforge-test-home-")
atexit.register(shutil.rmtree, _HOME, True)  # the Prefect home made here, and nothing else
for k, v in {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PREFECT_HOME": os.path.join(_HOME, "prefect"),
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ[k] = v

import pytest  # noqa: E402

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """A small built-in sample dataset (MVTec AD layout), made once per test session."""
    from defectforge.data.sample import make_sample

    root = tmp_path_factory.mktemp("sample") / "sample"
    make_sample(root, seed=0, size=64, n_train_good=6, n_test_good=3, n_defect=6)
    return root


@pytest.fixture(scope="session")
def sample_manifests(sample_root, tmp_path_factory):
    """(source manifest, split manifest) of the small sample."""
    from defectforge.params.data import DataParams
    from defectforge.params.split import SplitParams
    from defectforge.pipeline.ingest import run as run_ingest
    from defectforge.pipeline.split import run as run_split

    out = tmp_path_factory.mktemp("manifests")
    source = run_ingest(DataParams(layout="mvtec", root=str(sample_root)), out / "source.parquet", progress=False)
    split = run_split(SplitParams(), source, out / "split.parquet")
    return source, split


def _run(cmd, cwd):
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture(scope="session")
def make_project():
    """Factory: a git + DVC project holding this repo's pipeline with small params (and a local remote)."""
    import shutil
    import sys
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]

    def make(base: Path, *, remote: bool = True, **param_updates) -> Path:
        repo = base / "repo"
        repo.mkdir(parents=True)
        for item in ("dvc.yaml", "stages", "src"):
            src = root / item
            (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item, **({"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["sample"].update(size=64, n_train_good=6, n_test_good=3, n_defect=6)
        params["generate"].update(n_per_defect=2, shard_size=2, methods=["copy-paste"], workers=1)
        params["finetune"].update(workers=1)
        params["detector"].update(workers=1)  # tiny runs: a process pool would cost more than it saves
        params["pretrain"].update(steps=2, batch_size=2)
        params["finetune"].update(steps=2, batch_size=2)
        params["generate"]["inversion"].update(steps=3)
        params["generate"]["blended"].update(steps=3, adapt_steps=1)
        params["detector"].update(epochs=1, size=32, base_channels=4, depth=2)
        params["quality"].update(size=32)
        for section, values in param_updates.items():
            params[section].update(values)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        dvc = [sys.executable, "-m", "dvc"]
        _run(["git", "init", "-q"], repo)
        _run(["git", "config", "user.email", "test@example.com"], repo)
        _run(["git", "config", "user.name", "test"], repo)
        _run(dvc + ["init", "-q"], repo)
        _run(dvc + ["config", "core.analytics", "false"], repo)
        if remote:
            _run(dvc + ["remote", "add", "-d", "local", str(base / "remote")], repo)
        _run(["git", "add", "-A"], repo)
        _run(["git", "commit", "-qm", "project"], repo)
        return repo

    return make


@pytest.fixture(scope="session")
def run_cmd():
    return _run


class Reproduced:
    """A project after one ``dvc repro`` of the copy-paste DAG (made once per session)."""

    def __init__(self, repo, output: str):
        self.repo, self.output = repo, output

    def copy(self, dest):
        """A private copy (git history, DVC cache and outputs, the same local remote)."""
        import shutil

        target = dest / "repo"
        shutil.copytree(self.repo, target, symlinks=True)
        return target


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, make_project):
    """The copy-paste DAG reproduced once; tests take a ``.copy(tmp_path)`` instead of rerunning it."""
    import sys

    repo = make_project(tmp_path_factory.mktemp("reproduced"))
    return Reproduced(repo, _run([sys.executable, "-m", "dvc", "repro"], repo))


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n auto --dist loadgroup``) the tests that share the
    session's one ``dvc repro`` (``reproduced``) run on one worker, so the DAG is made once."""
    for item in items:
        if "reproduced" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("reproduced"))

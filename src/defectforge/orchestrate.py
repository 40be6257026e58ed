"""What the Prefect flows call: run the DVC DAG stage by stage, check gates, summarise.

The scheduled flow runs the *DVC* pipeline (``dvc repro -s <stage>`` in DAG order)
rather than calling stage code itself, so a scheduled run records ``dvc.lock`` exactly
as a manual ``dvc repro`` would, and a release can commit it. A stage that stops on
bad input or on a failed quality gate prints one ``error: ...`` line and exits 2:
that is a :class:`StageFailed` (never retried). Anything else (a killed worker, a
full disk, a CUDA hiccup) is a :class:`TransientStageError`, which Prefect retries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from defectforge.errors import DefectforgeError, ParamsError
from defectforge.config import parse_params


class StageFailed(DefectforgeError):
    """A stage refused its input or a quality gate failed: rerunning cannot help."""


class TransientStageError(RuntimeError):
    """A stage crashed for a reason outside its input: worth a retry."""


def _env() -> dict[str, str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def dvc_stages(repo: str | os.PathLike) -> list[str]:
    """Stage names of dvc.yaml in file order (which is the DAG order)."""
    path = Path(repo) / "dvc.yaml"
    if not path.is_file():
        raise DefectforgeError(f"{path}: not a defectforge DVC project (no dvc.yaml)")
    return list(yaml.safe_load(path.read_text())["stages"])


def apply_params(repo: str | os.PathLike, overrides: dict[str, Any] | None) -> None:
    """Set dotted keys in params.yaml (like ``dvc exp run -S``), validated before writing."""
    if not overrides:
        return
    path = Path(repo) / "params.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"{path}: {key}: no such section {part!r}")
            node = node[part]
        node[parts[-1]] = value
    parse_params(data, str(path))
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    os.replace(tmp, path)


def sync_inputs(repo: str | os.PathLike) -> str:
    """``dvc pull`` when a DVC remote is configured (what is missing is rebuilt by repro)."""
    repo = Path(repo)
    remotes = subprocess.run([sys.executable, "-m", "dvc", "remote", "list"], cwd=repo, env=_env(), capture_output=True, text=True)
    if not remotes.stdout.strip():
        return "no DVC remote configured: nothing to pull"
    r = subprocess.run([sys.executable, "-m", "dvc", "pull", "--allow-missing", "-q"], cwd=repo, env=_env(), capture_output=True, text=True)
    if r.returncode != 0:
        raise TransientStageError(f"dvc pull failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return "pulled inputs from the DVC remote"


def repro_stage(repo: str | os.PathLike, stage: str) -> str:
    """``dvc repro -s STAGE``; returns DVC's output. Raises StageFailed / TransientStageError."""
    r = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-s", stage], cwd=Path(repo), env=_env(), capture_output=True, text=True
    )
    out = r.stdout + r.stderr
    if r.returncode == 0:
        return out
    errors = [line[line.find("error: ") :] for line in out.splitlines() if "error: " in line and not line.startswith("ERROR")]
    if errors:
        raise StageFailed(f"stage {stage}: {errors[0][len('error: '):]}")
    raise TransientStageError(f"stage {stage} crashed: {out.strip()[-600:]}")


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

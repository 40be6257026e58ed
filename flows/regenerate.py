"""Prefect flow: scheduled regeneration of a defectforge dataset.

sync inputs (``dvc pull``) → the DVC DAG stage by stage (one task per stage, retried on
transient failures) → stop if a quality gate failed → publish a numbered release
(git tag + ``dvc push``) → a markdown artifact with counts and metrics.

A flow never computes: each task is one call into ``defectforge.orchestrate``, which
runs the work (``dvc``, the stage scripts, publishing) with the checkout's own
``.venv/bin/python`` and streams every output line into the run's log. On a process
worker the flow itself runs in the worker's Python (which needs only prefect: this
file puts the checkout's ``src`` first on ``sys.path``). Deployed by ``prefect.yaml``
onto the ``gpu`` work pool.

    python flows/regenerate.py --repo . --no-publish
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

for _k, _v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)

# the checkout's code, whatever the worker's Python has installed
_SRC = str(Path(__file__).resolve().parents[1] / "src")
if Path(_SRC, "defectforge").is_dir() and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from defectforge import orchestrate  # noqa: E402
from defectforge.errors import DefectforgeError  # noqa: E402


def _retry_transient(task, task_run, state) -> bool:
    """Retry crashes, never bad input or a failed gate: those fail the same way again."""
    try:
        state.result()
    except DefectforgeError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


TASK: dict[str, Any] = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)


def _log_lines():
    """Each output line of a stage into the run's log, as it comes (progress in the UI)."""
    return get_run_logger().info


@task(name="sync-inputs", **TASK)
def sync_inputs(repo: str) -> str:
    return orchestrate.sync_inputs(repo, log=_log_lines())


@task(name="repro-stage", task_run_name="repro-{stage}", **TASK)
def repro_stage(repo: str, stage: str) -> str:
    return orchestrate.repro_stage(repo, stage, log=_log_lines())


@task(name="publish", **TASK)
def publish(repo: str, name: str | None, push: bool) -> dict:
    from defectforge.params.file import load_params

    return orchestrate.publish(repo, name or load_params(f"{repo}/params.yaml").release.name, push=push, log=_log_lines())


@flow(name="defectforge-regenerate", log_prints=True)
def regenerate(repo: str = ".", params: dict[str, Any] | None = None, name: str | None = None, publish_release: bool = True, push: bool = True) -> dict:
    """Regenerate the dataset of the DVC project ``repo``.

    ``params``: dotted params.yaml overrides for this run (validated), e.g.
    ``{"data.root": "/mnt/data/mvtec/bottle", "generate.methods": ["inversion"]}``.
    ``push``: send the release to the git and DVC remotes (both must exist: checked first).
    """
    logger = get_run_logger()
    logger.info(f"flow process: {sys.executable}; stage work: {orchestrate.project_python(repo)}")
    if publish_release and push:
        orchestrate.check_push_targets(repo)  # before hours of generation, not after
    orchestrate.apply_params(repo, params)
    logger.info(sync_inputs(repo))
    for stage in orchestrate.dvc_stages(repo):
        repro_stage(repo, stage)  # a failed quality gate raises here: nothing is published
    published = publish(repo, name, push) if publish_release else None
    summary = orchestrate.run_summary(repo)
    report = orchestrate.report_path(repo, published)
    create_markdown_artifact(key="defectforge-run", markdown=orchestrate.summary_markdown(summary, published, report), description="counts and metrics of this run")
    if report is not None:
        create_link_artifact(key="defectforge-report", link=report.as_uri(), link_text="HTML report", description="the release's self-contained report")
    return {"summary": summary, "published": published}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".")
    ap.add_argument("--name", default=None)
    ap.add_argument("--no-publish", action="store_true")
    ap.add_argument("--no-push", action="store_true")
    a = ap.parse_args()
    print(regenerate(a.repo, None, a.name, not a.no_publish, not a.no_push))

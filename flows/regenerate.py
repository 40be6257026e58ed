"""Prefect flow: scheduled regeneration of a defectforge dataset.

sync inputs (``dvc pull``) → the DVC DAG stage by stage (one task per stage, retried on
transient failures) → stop if a quality gate failed → publish a numbered release
(git tag + ``dvc push``) → a markdown artifact with counts and metrics.

A flow never computes: each task is one call into ``defectforge.orchestrate`` or
``defectforge.publish.versions``. Deployed by ``prefect.yaml`` onto the ``gpu`` work pool.

    python flows/regenerate.py --repo . --no-publish
"""

from __future__ import annotations

import argparse
import os
from typing import Any

for _k, _v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from defectforge import orchestrate  # noqa: E402
from defectforge.publish import versions  # noqa: E402
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


@task(name="sync-inputs", **TASK)
def sync_inputs(repo: str) -> str:
    return orchestrate.sync_inputs(repo)


@task(name="repro-stage", task_run_name="repro-{stage}", **TASK)
def repro_stage(repo: str, stage: str) -> str:
    return orchestrate.repro_stage(repo, stage)


@task(name="publish", **TASK)
def publish(repo: str, name: str | None, push: bool) -> dict:
    from defectforge.config import load_params

    r = versions.publish(repo, name or load_params(f"{repo}/params.yaml").release.name, push=push)
    return {"tag": r.tag, "version": r.version, "created": r.created}


@flow(name="defectforge-regenerate", log_prints=True)
def regenerate(repo: str = ".", params: dict[str, Any] | None = None, name: str | None = None, publish_release: bool = True, push: bool = True) -> dict:
    """Regenerate the dataset of the DVC project ``repo``.

    ``params``: dotted params.yaml overrides for this run (validated), e.g.
    ``{"data.root": "/mnt/data/mvtec/bottle", "generate.methods": ["inversion"]}``.
    """
    logger = get_run_logger()
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

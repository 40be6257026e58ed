"""Prefect flow: the defectforge DAG, stage by stage, as tasks with retries.

Runs the same library functions as the DVC stages (``defectforge.pipeline``) and
writes the same paths (``defectforge.layout.Layout``). A flow never computes: every
task is one call into the library.

    python flows/regenerate.py --params params.yaml --workdir .
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

for _k, _v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false"}.items():
    os.environ.setdefault(_k, _v)

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from defectforge import pipeline  # noqa: E402
from defectforge.errors import DefectforgeError  # noqa: E402
from defectforge.layout import Layout  # noqa: E402
from defectforge.params import Params, load_params  # noqa: E402


def _retry_transient(task, task_run, state) -> bool:
    """Retry crashes of the machine or the file system, not bad input: that fails the same way again."""
    try:
        state.result()
    except DefectforgeError:
        return False
    except Exception:  # noqa: BLE001
        return True
    return False


TASK = dict(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=_retry_transient, cache_policy=NO_CACHE)


@task(name="sample", **TASK)
def sample_task(params: Params, out: Path) -> Path:
    return pipeline.run_sample(params.sample, out)


@task(name="ingest", **TASK)
def ingest_task(params: Params, out: Path, root: Path) -> Path:
    return pipeline.run_ingest(params.data, out, root=root, progress=False)


@task(name="split", **TASK)
def split_task(params: Params, source: Path, out: Path) -> Path:
    return pipeline.run_split(params.split, source, out)


@task(name="generate", **TASK)
def generate_task(params: Params, split: Path, out: Path) -> Path:
    return pipeline.run_generate(params.generate, split, out, progress=False)


@task(name="release", **TASK)
def release_task(params: Params, generated: Path, out: Path) -> Path:
    return pipeline.run_release(params.release, generated, out)


@flow(name="defectforge-regenerate", log_prints=True)
def regenerate(params_path: str = "params.yaml", workdir: str = ".") -> str:
    """Run sample → ingest → split → generate → release; returns the release manifest path."""
    logger = get_run_logger()
    params = load_params(params_path)
    layout = Layout(Path(workdir))
    root = Path(params.data.root)
    if not root.is_absolute():
        root = Path(params_path).resolve().parent / root
    sample_task(params, layout.sample)
    source = ingest_task(params, layout.source, root)
    split = split_task(params, source, layout.split)
    generated = generate_task(params, split, layout.generated)
    manifest = release_task(params, generated, layout.release)
    logger.info("released %s", manifest)
    return str(manifest)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workdir", default=".")
    a = ap.parse_args()
    print(regenerate(a.params, a.workdir))

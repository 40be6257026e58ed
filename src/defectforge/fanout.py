"""Fan-out of generation shards on Dask.

Design: the *stage* fans out. ``dvc repro`` runs one ``generate`` stage holding the
one workspace lock; inside it, the driver plans the shards, clears stale output once,
and maps shard chunks onto a Dask cluster: a ``LocalCluster`` of processes by default
(``generate.workers``), or an existing cluster at ``generate.scheduler``
(``tcp://host:8786``) whose workers see the same file system (a shared volume on GPU
machines). Each shard is independent and idempotent (its manifest part is committed
by an atomic rename; a finished shard is skipped), so a lost worker's shard is simply
run again by Dask. The manifest is the folder of committed parts, checked once at the end.
"""

from __future__ import annotations

import os
from pathlib import Path

from defectforge.errors import DefectforgeError
from defectforge.params import GenerateParams


def _run_shards(p_json: str, name: str, split: str, out_root: str, checkpoints: str | None, shards: list[int]) -> list[int]:
    """Worker task: generate the given shards (a fresh method per process)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    from defectforge.pipeline import generate_method

    p = GenerateParams.model_validate_json(p_json)
    generate_method(p, name, split, out_root, checkpoints=checkpoints, progress=False, shards=shards)
    return shards


def generate_on_dask(
    p: GenerateParams, name: str, split: str | os.PathLike, out_root: str | os.PathLike, *, checkpoints: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Generate method ``name``'s shards on Dask into ``out_root/<name>/``; returns its shard folder."""
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    from defectforge.generate import prepare_output
    from defectforge.pipeline import build_method

    method = build_method(p, name)
    n_shards = prepare_output(
        split, Path(out_root) / name, method_name=method.name, n_per_defect=p.n_per_defect, seed=p.seed, shard_size=p.shard_size, params_sha256=p.method_sha256(name)
    )
    cluster = None
    if p.scheduler:
        client = Client(p.scheduler, timeout="20s")
    else:
        cluster = LocalCluster(n_workers=p.workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        # one chunk of shards per task keeps the per-task cost (loading a model) low
        n_tasks = max(1, min(n_shards, 4 * max(p.workers, len(client.scheduler_info()["workers"]) or 1)))
        chunks = [list(range(i, n_shards, n_tasks)) for i in range(n_tasks)]
        n = len(chunks)
        ck = str(checkpoints) if checkpoints is not None else None
        futures = client.map(_run_shards, [p.model_dump_json()] * n, [name] * n, [str(split)] * n, [str(out_root)] * n, [ck] * n, chunks, pure=False)
        with tqdm(total=n_shards, desc=f"generate[{method.name}] shards on dask", disable=not progress) as bar:
            for fut in as_completed(futures):
                try:
                    bar.update(len(fut.result()))
                except DefectforgeError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise DefectforgeError(f"generate: a Dask worker failed: {exc.__class__.__name__}: {exc}") from None
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return Path(out_root) / name / "manifest"

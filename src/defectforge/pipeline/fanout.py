"""Fan-out of the generate stage's shards on Dask (beside :mod:`defectforge.pipeline.generate`).

Design: the *stage* fans out. ``dvc repro`` runs one ``generate`` stage holding the
one workspace lock; inside it, the driver (:func:`defectforge.pipeline.generate.run`) plans the shards, clears stale
output once, and maps shard chunks onto a Dask cluster: a ``LocalCluster`` of processes by default
(``generate.workers``), or an existing cluster at ``generate.scheduler``
(``tcp://host:8786``) whose workers see the same file system (a shared volume on GPU
machines). Each shard is independent and idempotent (its manifest part is committed
by an atomic rename; a finished shard is skipped), so a lost worker's shard is simply
run again by Dask. The manifest is the folder of committed parts, checked once at the end.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from defectforge.errors import DefectforgeError, ParamsError

CONNECT_TIMEOUT_S = 5.0  # how long a scheduler at generate.scheduler has to answer (Dask's default retries for 30 s)


def _unreachable(address: str, why: str) -> ParamsError:
    return ParamsError(f"generate.scheduler: no Dask scheduler answered at {address} ({why}); start one there "
                       "(`dask scheduler`) or leave generate.scheduler empty for a local cluster of generate.workers")


def check_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse, in one line naming ``address``, a ``tcp://host:port`` where nothing accepts a
    connection (refused, unresolvable or silent for ``timeout`` s): a plain socket connect,
    before the stage writes anything. Other schemes are left to the client's own timeout."""
    import socket
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise _unreachable(address, f"not an address: {exc}") from None
    if parts.scheme != "tcp":
        return
    if not host or not port:
        raise _unreachable(address, "no host:port in it")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.timeout:
        raise _unreachable(address, f"no answer within {timeout:g} s") from None
    except OSError as exc:
        raise _unreachable(address, exc.strerror or exc.__class__.__name__) from None


def _work(work: Callable[..., Any], args: tuple, kwargs: dict, shards: list[int]) -> list[int]:
    """Worker task: ``work(*args, shards=shards, **kwargs)`` with one torch thread per process."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    work(*args, shards=shards, progress=False, **kwargs)
    return shards


def run_on_dask(work: Callable[..., Any], args: tuple, n_shards: int, *, workers: int, scheduler: str = "", kwargs: dict | None = None,
                desc: str = "shards", progress: bool = True) -> None:
    """Run ``work(*args, shards=chunk)`` over chunks of ``range(n_shards)`` on a Dask cluster.

    ``scheduler``: the address of an existing cluster (``tcp://host:8786``); empty: a
    ``LocalCluster`` of ``workers`` processes. ``work`` must be importable by the workers
    (a module-level function), and idempotent per shard.
    """
    from dask.distributed import Client, LocalCluster, as_completed
    from tqdm import tqdm

    cluster = None
    if scheduler:
        check_scheduler(scheduler)
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S:g}s")
        except (OSError, TimeoutError, ValueError) as exc:  # it accepted a socket but spoke no Dask in time
            raise _unreachable(scheduler, str(exc).splitlines()[0][:200] if str(exc) else exc.__class__.__name__) from None
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        # one chunk of shards per task keeps the per-task cost (loading a model) low
        n_tasks = max(1, min(n_shards, 4 * max(workers, len(client.scheduler_info()["workers"]) or 1)))
        chunks = [list(range(i, n_shards, n_tasks)) for i in range(n_tasks)]
        futures = [client.submit(_work, work, args, kwargs or {}, chunk, pure=False) for chunk in chunks]
        with tqdm(total=n_shards, desc=f"{desc} on dask", disable=not progress) as bar:
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

"""Independent trainings of one stage side by side: ``finetune.workers`` (defect types) and
``detector.workers`` ((category, seed, run) detectors).

Each job is a function of its own arguments and seed, so the results equal one worker's
(tests/pipeline/test_reproducible.py, tests/pipeline/test_evaluate.py). Workers are spawned (a clean
torch in each) and inherit the stage's CPU-kernel pin (:func:`~defectforge.pipeline.entry.pin_cpu_isa`).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator


def spawn_map(fn: Callable, args: Iterable[tuple], workers: int, n: int) -> Iterator:
    """``fn(*a)`` for each of the ``n`` argument tuples ``args``, yielded in order as they
    finish; on ``workers`` spawned processes when > 1 (``fn`` must be a module-level function)."""
    workers = min(workers, n)
    if workers <= 1:
        for a in args:
            yield fn(*a)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from defectforge.pipeline.entry import pin_cpu_isa

    pin_cpu_isa()  # inherited by the workers: the kernels of the stage's own process
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(fn, *zip(*args))

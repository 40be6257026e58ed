"""Glue for the thin DVC stage scripts in ``stages/``.

A stage script is ``@stage`` on a function of its command-line paths; this turns a
:class:`DefectforgeError` into one line on stderr and exit status 2, switches off
analytics and pins torch to the configured number of threads and, on x86-64 CPUs with
AVX2, the numerical kernels to AVX2 (:func:`pin_cpu_isa`; ``docs/reproducibility.md``).
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from typing import Callable

from defectforge.errors import DefectforgeError

ANALYTICS_OFF = {
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
# One torch thread per process unless the user says otherwise: on a loaded CPU two
# threads ran 5x slower than one (fan-out uses processes, not threads).
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# ATen, oneDNN and MKL each pick their kernels by the CPU's instruction set, and kernels of
# different vector widths round float sums differently (measured: ATen's DEFAULT kernels,
# oneDNN capped at SSE4.1 and MKL_CBWR=COMPATIBLE each change the pretrained weights).
# Capped at AVX2, a CPU with AVX-512 should compute what one with only AVX2 does. torch
# reads these lazily (at the first tensor operation), so setting them before any
# computation is enough; a value the user set is kept.
CPU_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pin_cpu_isa() -> bool:
    """Set :data:`CPU_ISA` (unless already set) on an x86-64 CPU with AVX2 and FMA; True if
    the CPU qualifies. Without AVX2 (or off x86-64) nothing is set: the results then differ
    from an AVX2 machine's in the last bits."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not {"avx2", "fma"} <= _cpu_flags():
        return False
    for k, v in CPU_ISA.items():
        os.environ.setdefault(k, v)
    return True


def prepare_process() -> None:
    """What every entry point (a DVC stage script, the ``defectforge`` command) sets before any
    computation, so both give the same bytes: analytics off, :data:`THREADS`, :func:`pin_cpu_isa`.
    A value the user set is kept."""
    for k, v in {**ANALYTICS_OFF, **THREADS}.items():
        os.environ.setdefault(k, v)
    pin_cpu_isa()


def end_progress_lines() -> None:
    """Close every progress bar still open, so what is printed next starts on a line of its own.

    A tqdm bar draws on stderr without a newline; an error raised while one is open (and not
    closed by its ``with`` or ``finally``) would otherwise be printed at the end of the bar's
    line. Closing redraws the bar and ends its line; a closed bar's second close does nothing.
    """
    std = sys.modules.get("tqdm.std")  # never imported here: no tqdm loaded, no bar open
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar whose stream is gone: nothing to end
            pass


def stage(fn: Callable[..., object]) -> Callable[[], None]:
    @functools.wraps(fn)
    def main() -> None:
        prepare_process()
        try:
            fn(*sys.argv[1:])
        except DefectforgeError as exc:
            end_progress_lines()
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return main

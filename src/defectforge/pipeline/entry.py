"""Glue for the thin DVC stage scripts in ``stages/``.

A stage script is ``@stage`` on a function of its command-line paths; this turns a
:class:`DefectforgeError` into one line on stderr and exit status 2, switches off
analytics and pins torch to the configured number of threads.
"""

from __future__ import annotations

import functools
import os
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


def stage(fn: Callable[..., object]) -> Callable[[], None]:
    @functools.wraps(fn)
    def main() -> None:
        for k, v in {**ANALYTICS_OFF, **THREADS}.items():
            os.environ.setdefault(k, v)
        try:
            fn(*sys.argv[1:])
        except DefectforgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return main

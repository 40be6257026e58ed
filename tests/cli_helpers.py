"""The command line in-process, for tests (``from cli_helpers import run_cli``)."""

from __future__ import annotations

import contextlib
import io
import subprocess


def run_cli(*args) -> subprocess.CompletedProcess:
    """``defectforge.cli.main`` in-process: exit status, stdout, stderr as a CompletedProcess.

    In-process saves a Python start and the torch / Great Expectations imports per call;
    test_cli.py::test_bad_params_key_stops_a_stage keeps one real subprocess end to end.
    """
    from defectforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["defectforge", *map(str, args)], code, out.getvalue(), err.getvalue())

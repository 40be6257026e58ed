"""An error raised while a progress bar is open starts a line of its own: the bar (tqdm, on
stderr, no newline while it runs) is closed before ``error:`` is printed, by the command line
and by the stage scripts alike."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest
from tqdm import tqdm

from defectforge.errors import DataError


def _open_bar_then_fail(*_args):
    bar = tqdm(total=10, desc="generate", file=sys.stderr)
    bar.update(3)
    raise DataError("boom")  # the bar is left open, as by a loop that does not close it


def _lines_starting_with_error(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.startswith("error: ")]


def test_cli_error_after_an_open_bar_starts_its_own_line():
    from defectforge.cli import _report

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _open_bar_then_fail()
        except DataError as exc:
            _report(exc)
    text = err.getvalue()
    assert "generate" in text  # the bar was drawn
    assert _lines_starting_with_error(text) == ["error: boom"], repr(text)


def test_stage_error_after_an_open_bar_starts_its_own_line(monkeypatch):
    from defectforge.pipeline.entry import stage

    monkeypatch.setattr(sys, "argv", ["stage"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit):
        stage(_open_bar_then_fail)()
    assert _lines_starting_with_error(err.getvalue()) == ["error: boom"], repr(err.getvalue())

"""Two generate runs into one --out: the second refuses at once with one line naming the holder
(pid, host, start time) and writes nothing; the lock goes with the run (never part of the output),
and a stale lock file left by a killed run does not block a resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from cli_helpers import run_cli

from defectforge.pipeline.generate import LOCK_FILE, lock_output

PARAMS = "generate:\n  methods: [copy-paste]\n  n_per_defect: {n}\n  shard_size: 2\n"


@pytest.fixture
def setup(sample_manifests, tmp_path):
    _, split = sample_manifests
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.format(n=2))
    return split, params


def test_second_run_into_a_locked_folder_refuses_naming_the_holder(setup, tmp_path):
    split, params = setup
    out = tmp_path / "gen"
    # the first run, in another process, holds the lock until told to go on
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from defectforge.pipeline.generate import lock_output
        with lock_output(Path({str(out)!r}), "generate"):
            print("locked", flush=True)
            sys.stdin.readline()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_cli("generate", "--split", split, "--out", out, "--params", params)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(errors) == 1, r.stdout + r.stderr
        assert f"pid {holder.pid}" in errors[0] and socket.gethostname() in errors[0] and "started 20" in errors[0], errors[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing
    finally:
        holder.communicate("\n", timeout=60)
    assert not out.exists() or not (out / LOCK_FILE).exists()
    assert run_cli("generate", "--split", split, "--out", out, "--params", params).returncode == 0  # free again


def test_lock_is_not_left_in_the_output_and_a_stale_one_does_not_block(setup, tmp_path):
    split, params = setup
    out = tmp_path / "gen"
    assert run_cli("generate", "--split", split, "--out", out, "--params", params).returncode == 0
    assert not (out / LOCK_FILE).exists()  # never part of the DVC output
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "gone", "started": "2026-01-01T00:00:00Z"}))  # a killed run's
    params.write_text(PARAMS.format(n=3))
    assert run_cli("generate", "--split", split, "--out", out, "--params", params).returncode == 0
    assert not (out / LOCK_FILE).exists()
    stale = tmp_path / "fresh"
    stale.mkdir()
    (stale / LOCK_FILE).write_text("")  # killed before it marked the folder: still as good as empty
    assert run_cli("generate", "--split", split, "--out", stale, "--params", params).returncode == 0


def test_lock_in_one_process_excludes_another_open(tmp_path):
    from defectforge.errors import OutputError

    with lock_output(tmp_path / "o", "generate"):
        with pytest.raises(OutputError, match=rf"another generate run .*pid {os.getpid()} on host"):
            with lock_output(tmp_path / "o", "generate"):
                pass
    with lock_output(tmp_path / "o", "generate"):
        pass

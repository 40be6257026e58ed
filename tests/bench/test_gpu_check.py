"""bench/gpu_check.py (make gpu-check) without a GPU: it refuses in one line, exit 2, before it
builds or writes anything."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def test_refuses_in_one_line_without_a_cuda_device(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device, even on a machine that has one
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work-dir", str(tmp_path / "work")],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: ") and "CUDA" in lines[0], r.stderr[-2000:]
    assert r.stdout == "" and not out.exists() and not (tmp_path / "work").exists()


def test_refuses_a_cpu_only_torch_build(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit) as e:
        mod.refuse_without_cuda("x.json")
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CPU-only" in err[0]


def test_make_gpu_check_runs_the_script():
    r = subprocess.run(["make", "-n", "gpu-check"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "bench/gpu_check.py" in r.stdout

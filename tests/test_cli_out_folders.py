"""Every command that takes an output folder refuses, in one line and before any work or write,
``.``, ``..``, the current folder by another spelling (``./``, ``sub/..``, its absolute path, a
link to it), ``/``, a project's root and a folder holding one of its inputs (exit 2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cli_helpers import run_cli

from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate


@pytest.fixture(scope="module")
def inputs(sample_manifests, tmp_path_factory):
    """{name: path} of what the commands read: split and synthetic manifests, a (dummy) model folder."""
    _, split = sample_manifests
    base = tmp_path_factory.mktemp("outs")
    gen = run_generate(GenerateParams(n_per_defect=1, shard_size=2, seed=0), split, base / "gen", progress=False)
    model = base / "model"
    model.mkdir()
    return {"split": split, "synthetic": gen / "copy-paste" / "manifest", "model": model}


COMMANDS = {  # command: its options other than --out, as {option: input name}
    "sample": {},
    "pretrain": {"--split": "split"},
    "finetune": {"--split": "split", "--base": "model"},
    "generate": {"--split": "split"},
    "refine": {"--split": "split", "--generated": "synthetic"},
    "quality": {"--split": "split", "--refined": "synthetic"},
    "detector": {"--split": "split", "--refined": "synthetic"},
    "release": {"--refined": "synthetic", "--split": "split"},
}
OUTS = {  # spelling: what the line says
    ".": "is the current folder",
    "./": "is the current folder",
    "..": "holds the current folder",
    "sub/..": "is the current folder",
    "absolute": "is the current folder",
    "link": "is the current folder",
    "/": "is the file system's root",
    "project": "is a project's root (it holds .git)",
    "input parent": "holds the input",
}


def _tree(*folders) -> dict:
    return {str(f): sorted(str(p.relative_to(f)) for p in Path(f).rglob("*")) for f in folders}


@pytest.mark.parametrize("out", list(OUTS))
@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_an_out_folder_no_run_may_fill_is_one_line(inputs, tmp_path, monkeypatch, cmd, out):
    import importlib

    if cmd == "sample" and out == "input parent":
        pytest.skip("sample reads no input")
    stage = importlib.import_module(f"defectforge.pipeline.{cmd}")

    def reached(*a, **k):
        raise AssertionError(f"{cmd} ran with --out {out}")

    monkeypatch.setattr(stage, "run", reached)
    here = tmp_path / "proj" / "here"
    here.mkdir(parents=True)
    (tmp_path / "proj" / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "link").symlink_to(here)
    monkeypatch.chdir(here)
    given = {"absolute": here, "link": tmp_path / "link", "project": tmp_path / "repo",
             "input parent": inputs["split"].parent}.get(out, out)
    args = [cmd, "--out", given]
    for opt, name in COMMANDS[cmd].items():
        args += [opt, inputs[name]]
    before = _tree(tmp_path, inputs["split"].parent, inputs["synthetic"].parent.parent.parent)
    r = run_cli(*args)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"error: {Path(given)}: --out" in errors[0] and OUTS[out] in errors[0], errors[0]
    assert _tree(tmp_path, inputs["split"].parent, inputs["synthetic"].parent.parent.parent) == before
    assert os.getcwd() == str(here)

"""Every command line entry that takes a manifest refuses one of another kind in one line naming
the file, the kind it is and the kind the option takes (exit 2), before any work or write."""

from __future__ import annotations

import os

import pytest
from cli_helpers import run_cli

from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate


@pytest.fixture(scope="module")
def manifests(sample_manifests, tmp_path_factory):
    """{kind: path}: a source, a split and a synthetic (generate output) manifest."""
    source, split = sample_manifests
    gen = run_generate(GenerateParams(n_per_defect=1, shard_size=2, seed=0), split, tmp_path_factory.mktemp("kinds") / "gen",
                       progress=False)
    return {"source": source, "split": split, "synthetic": gen / "copy-paste" / "manifest"}


# (command, option given the wrong manifest, the kind it takes, the wrong kind, the other options: {option: kind or "out"})
CASES = [
    ("split", "--source", "source", "split", {"--out": "file"}),
    ("pretrain", "--split", "split", "source", {"--out": "out"}),
    ("pretrain", "--split", "split", "synthetic", {"--out": "out"}),
    ("finetune", "--split", "split", "source", {"--base": "out", "--out": "out"}),
    ("generate", "--split", "split", "source", {"--out": "out"}),
    ("generate", "--split", "split", "synthetic", {"--out": "out"}),
    ("refine", "--split", "split", "synthetic", {"--generated": "synthetic", "--out": "out"}),
    ("quality", "--split", "split", "synthetic", {"--refined": "synthetic", "--out": "out"}),
    ("quality", "--refined", "synthetic", "split", {"--split": "split", "--out": "out"}),
    ("detector", "--split", "split", "source", {"--refined": "synthetic", "--out": "out"}),
    ("detector", "--refined", "synthetic", "split", {"--split": "split", "--out": "out"}),
    ("release", "--refined", "synthetic", "split", {"--out": "out"}),
    ("release", "--split", "split", "synthetic", {"--refined": "synthetic", "--out": "out"}),
]


@pytest.mark.parametrize("cmd,option,takes,given,others", CASES, ids=[f"{c[0]}{c[1]}={c[3]}" for c in CASES])
def test_a_manifest_of_another_kind_is_one_line(manifests, tmp_path, monkeypatch, cmd, option, takes, given, others):
    monkeypatch.chdir(tmp_path)
    args = [cmd, option, manifests[given]]
    for opt, what in others.items():
        args += [opt, {"out": tmp_path / "out", "file": tmp_path / "out.parquet"}.get(what) or manifests[what]]
    r = run_cli(*args)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    line = errors[0]
    assert str(manifests[given]) in line, line
    assert f"is a {given} manifest" in line and f"{cmd} {option} takes a {takes} manifest" in line, line
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "out.parquet")

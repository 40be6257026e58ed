"""Exact reproduction: the training stages write the same bytes on every rerun.

The committed dvc.lock once failed to reproduce on a fresh clone because the pretrain
folder held the wall-clock training time (base.json and model_index.json), and the
weights depended on the number of torch threads. See docs/reproducibility.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from defectforge.params.finetune import FinetuneParams
from defectforge.params.finetune import FinetuneParams
from defectforge.params.pretrain import PretrainParams
from defectforge.params.pretrain import PretrainParams
from defectforge.pipeline import entry
from defectforge.pipeline import finetune as finetune_stage
from defectforge.pipeline import pretrain as pretrain_stage

CHEAP = PretrainParams(steps=2, batch_size=2, device="cpu")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_same_bytes(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb), f"different file sets: {sorted(set(fa) ^ set(fb))}"
    differ = [name for name in fa if fa[name] != fb[name]]
    assert not differ, f"files differ between two runs with the same inputs: {differ}"


@pytest.fixture(scope="module")
def split(sample_manifests):
    return sample_manifests[1]


@pytest.fixture(scope="module")
def first_pretrain(split, tmp_path_factory):
    return pretrain_stage.run(CHEAP, split, tmp_path_factory.mktemp("pretrain") / "base", progress=False)


@pytest.mark.slow
def test_pretrain_rerun_is_byte_identical(split, first_pretrain, tmp_path):
    again = pretrain_stage.run(CHEAP, split, tmp_path / "base", progress=False)
    _assert_same_bytes(first_pretrain, again)
    assert (again / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_pretrain_files_hold_no_wall_clock_time(first_pretrain):
    for name in ("base.json", "model/model_index.json"):
        text = (first_pretrain / name).read_text()
        assert "seconds" not in text, f"{name} holds a timing: {text}"
    metrics = json.loads((first_pretrain / "base.json").read_text())["metrics"]
    assert metrics["steps"] == CHEAP.steps and metrics["batch_size"] == CHEAP.batch_size


@pytest.mark.slow
def test_pretrain_weights_do_not_depend_on_the_thread_count(split, first_pretrain, tmp_path):
    """The same run with two torch threads (as on a machine where OMP_NUM_THREADS is not
    set to 1, or the library is called outside the DVC stage) gives the same weights."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        again = pretrain_stage.run(CHEAP, split, tmp_path / "base", progress=False)
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    _assert_same_bytes(first_pretrain, again)


# A stage run in a fresh interpreter: its first tensor operation comes after pin_cpu_isa(), as
# in a DVC stage. (In this test process an earlier test may already have computed with the
# CPU's own widest kernels, e.g. AVX-512, which the pin cannot change afterwards.)
_FRESH = """
import json, os, sys
if sys.argv[1] == "one-core":
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # before torch starts its threads
from defectforge.params.finetune import FinetuneParams
from defectforge.params.pretrain import PretrainParams
from defectforge.pipeline import finetune, pretrain
a = json.loads(sys.argv[2])
if a["stage"] == "pretrain":
    pretrain.run(PretrainParams(**a["p"]), a["split"], a["out"], progress=False)
else:
    finetune.run(FinetuneParams(**a["p"]), a["split"], a["base"], a["out"], progress=False)
"""


def _fresh(stage: str, p, out: Path, split, base=None, cores: str = "all") -> Path:
    import subprocess
    import sys

    args = {"stage": stage, "p": p.model_dump(mode="json"), "split": str(split), "out": str(out), "base": str(base)}
    r = subprocess.run([sys.executable, "-c", _FRESH, cores, json.dumps(args)], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_pretrain_threads_is_part_of_the_result_not_of_the_machine(split, tmp_path):
    """pretrain.threads = 2 on a process pinned to one core writes the bytes of an unpinned
    run with 2 threads, and other weights than 1 thread: the weights follow the setting, not the cores."""
    two = CHEAP.model_copy(update={"threads": 2})
    free = _fresh("pretrain", two, tmp_path / "free", split)
    _assert_same_bytes(free, _fresh("pretrain", two, tmp_path / "pinned", split, cores="one-core"))
    one = _fresh("pretrain", CHEAP, tmp_path / "one", split)
    weights = Path("model/unet/diffusion_pytorch_model.safetensors")
    assert (one / weights).read_bytes() != (free / weights).read_bytes()  # 1 thread: other weights


def test_training_restores_the_callers_thread_count():
    from defectforge.diffusion.training import TRAIN_THREADS, fixed_threads

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with fixed_threads():
            assert torch.get_num_threads() == TRAIN_THREADS
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_finetune_rerun_is_byte_identical(split, first_pretrain, tmp_path):
    p = FinetuneParams(steps=2, batch_size=2, device="cpu")
    a = finetune_stage.run(p, split, first_pretrain, tmp_path / "a", progress=False)
    b = finetune_stage.run(p, split, first_pretrain, tmp_path / "b", progress=False)
    _assert_same_bytes(a, b)
    index = (a / "checkpoints.json").read_text()
    assert "seconds" not in index and json.loads(index), index
    for meta in a.rglob("defectforge_finetune.json"):
        assert "seconds" not in meta.read_text(), meta


@pytest.mark.slow
def test_finetune_on_two_processes_writes_the_bytes_of_one(split, first_pretrain, tmp_path):
    """finetune.workers = 2 trains the defect types in spawned processes: the same files as in-process."""
    one = _fresh("finetune", FinetuneParams(steps=2, batch_size=2, device="cpu"), tmp_path / "one", split, base=first_pretrain)
    two = _fresh("finetune", FinetuneParams(steps=2, batch_size=2, device="cpu", workers=2), tmp_path / "two", split, base=first_pretrain)
    _assert_same_bytes(one, two)
    assert len(json.loads((two / "checkpoints.json").read_text())) > 1  # more than one type, so both processes trained


@pytest.mark.parametrize("has_avx2", [True, False])
def test_stage_entry_pins_the_cpu_instruction_set(monkeypatch, has_avx2):
    for k in entry.CPU_ISA:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41")  # the user's own choice is kept
    monkeypatch.setattr(entry.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(entry, "_cpu_flags", lambda: {"sse4_1", "avx", "fma", "avx2"} if has_avx2 else {"sse4_1", "avx"})
    monkeypatch.setattr(entry.sys, "argv", ["stage"])
    monkeypatch.setattr(entry, "THREADS", {})  # leave this process's other settings alone
    monkeypatch.setattr(entry, "ANALYTICS_OFF", {})
    seen = {}

    @entry.stage
    def main() -> None:
        seen.update({k: entry.os.environ.get(k) for k in entry.CPU_ISA})

    main()
    assert seen["ONEDNN_MAX_CPU_ISA"] == "SSE41"
    if has_avx2:
        assert seen["ATEN_CPU_CAPABILITY"] == "avx2" and seen["MKL_CBWR"] == "AVX2"
    else:  # a CPU without AVX2 must not be told to use it (illegal instruction)
        assert seen["ATEN_CPU_CAPABILITY"] is None and seen["MKL_CBWR"] is None


@pytest.mark.slow
def test_a_retrained_model_is_not_taken_for_done_shards(split, first_pretrain, tmp_path):
    """generate's output persists between DVC runs (a killed run resumes). When the finetune
    stage's models change, the samples they painted must be made again, not skipped as done."""
    from defectforge.params.generate import GenerateParams
    from defectforge.manifest.io import read_manifest
    from defectforge.pipeline import generate as generate_stage

    ft_a = finetune_stage.run(FinetuneParams(steps=1, batch_size=2, device="cpu"), split, first_pretrain, tmp_path / "ft_a", progress=False)
    ft_b = finetune_stage.run(FinetuneParams(steps=1, batch_size=2, device="cpu", seed=1), split, first_pretrain, tmp_path / "ft_b", progress=False)
    p = GenerateParams(methods=["inversion"], n_per_defect=1, shard_size=4, inversion={"steps": 2, "device": "cpu"})
    out = tmp_path / "gen"
    first = read_manifest(generate_stage.run(p, split, out, checkpoints=ft_a, progress=False)).to_pandas()
    again = read_manifest(generate_stage.run(p, split, out, checkpoints=ft_a, progress=False)).to_pandas()
    assert list(again.sample_id) == list(first.sample_id)  # same models: resumed, nothing new
    retrained = read_manifest(generate_stage.run(p, split, out, checkpoints=ft_b, progress=False)).to_pandas()
    assert not set(retrained.sample_id) & set(first.sample_id)
    assert set(retrained.checkpoint_sha256) != set(first.checkpoint_sha256)  # painted by the new models
    assert generate_stage.models_sha256("copy-paste", ft_a) == ""  # model-free: ids as before

"""generate.precision on the pretrained path, at test size on CPU: the diffusion methods load their
models in bf16 (the UNet call's output is bf16) and make valid samples that differ from fp32's;
fp16 is refused off CUDA before anything is written; fp32 keeps the params hash (and so every
sample id and byte) of a run without the param.

The stages are those of the full-size nightly test (tests/diffusion/test_sd15_path.py) on the
test-size latent model: one defect type, LoRA fine-tune, the four diffusion methods.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from defectforge.errors import ParamsError
from defectforge.params.generate import GenerateParams
from test_sd15_path import DIFFUSION, run_stage, stage_params

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, tiny_latent_dir):
    """data, pretrain and finetune of the nightly test's one defect type, on the test-size latent model."""
    work = tmp_path_factory.mktemp("precision")
    for stage in ("data", "pretrain", "finetune"):
        run_stage(stage, work, tiny_latent_dir)
    return work


def _generate(work, model_dir, precision, out_name):
    from defectforge.pipeline import generate

    _, _, gen, _, _ = stage_params(model_dir)
    gen = GenerateParams(**{**gen.model_dump(), "precision": precision})
    generate.run(gen, work / "split.parquet", work / out_name, checkpoints=work / "finetune", progress=False)
    return work / out_name


def _images(root) -> dict[str, list[np.ndarray]]:
    from defectforge.manifest.io import read_manifest

    out = {}
    for name in DIFFUSION:
        rows = read_manifest(root / name / "manifest").to_pandas().sort_values("seed")
        out[name] = [np.asarray(Image.open(root / p)) for p in rows["image_path"]]
    return out


@pytest.mark.slow
def test_bf16_generation_runs_the_unet_in_bf16_and_makes_other_valid_samples(finetuned, tiny_latent_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    out_dtypes: list[torch.dtype] = []
    forward = UNet2DConditionModel.forward

    def recorded(self, *a, **k):
        out = forward(self, *a, **k)
        out_dtypes.append(out.sample.dtype if hasattr(out, "sample") else out[0].dtype)
        return out

    monkeypatch.setattr(UNet2DConditionModel, "forward", recorded)
    bf16 = _images(_generate(finetuned, tiny_latent_dir, "bf16", "gen-bf16"))
    assert out_dtypes and set(out_dtypes) == {torch.bfloat16}, set(out_dtypes)  # every UNet call of every method
    out_dtypes.clear()
    fp32 = _images(_generate(finetuned, tiny_latent_dir, "fp32", "gen-fp32"))
    assert set(out_dtypes) == {torch.float32}
    for name in DIFFUSION:
        assert len(bf16[name]) == len(fp32[name]) == 2, name
        for a, b in zip(bf16[name], fp32[name]):
            assert a.dtype == np.uint8 and a.shape == b.shape == (96, 96, 3), (name, a.shape)
            assert a.std() > 0  # an image, not a constant (a NaN decodes to one value)
        assert any((a != b).any() for a, b in zip(bf16[name], fp32[name])), name  # bf16 weights: other samples


def test_fp16_on_cpu_is_refused_before_anything_is_written(finetuned, tiny_latent_dir):
    with pytest.raises(ParamsError, match=r"^generate\.precision: fp16 needs a CUDA device, got cpu"):
        _generate(finetuned, tiny_latent_dir, "fp16", "gen-fp16")
    assert not (finetuned / "gen-fp16").exists()


def test_fp32_keeps_the_params_hash_and_half_precision_changes_only_the_diffusion_methods():
    def before(p: GenerateParams, method: str) -> str:  # the hash as it was computed before the param existed
        sections = {m.replace("-", "_") for m in p.needs_checkpoints}
        common = p.model_dump(mode="json", exclude={"methods", "batch_size", "workers", "scheduler", "precision", *sections})
        own = getattr(p, method.replace("-", "_"), None)
        blob = {"common": common, "method": method, "own": own.model_dump(mode="json") if own is not None else None}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    fp32, bf16 = GenerateParams(methods=["copy-paste", "inversion"]), GenerateParams(methods=["copy-paste", "inversion"], precision="bf16")
    for method in ("copy-paste", "inversion"):
        assert fp32.method_sha256(method) == before(fp32, method)
    assert bf16.method_sha256("copy-paste") == fp32.method_sha256("copy-paste")  # no model: the same samples
    assert bf16.method_sha256("inversion") != fp32.method_sha256("inversion")


def test_precision_dtype_refuses_fp16_off_cuda_and_names_the_param():
    from defectforge.diffusion.models import precision_dtype

    assert precision_dtype("bf16", "cpu") is torch.bfloat16 and precision_dtype("fp32", "cpu") is torch.float32
    with pytest.raises(ParamsError, match=r"^finetune\.x: fp16 needs a CUDA device"):
        precision_dtype("fp16", "cpu", param="finetune.x")
    with pytest.raises(ParamsError, match=r"must be one of fp32, bf16, fp16, got 'fp8'"):
        precision_dtype("fp8", "cpu")

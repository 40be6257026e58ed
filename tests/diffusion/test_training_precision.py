"""finetune's memory options at test size on CPU: bf16 mixed precision (autocast), gradient
checkpointing and the 8-bit AdamW, on the pretrained profile's test-size latent model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from defectforge.diffusion.training import finetune
from defectforge.errors import ParamsError


def _defects(n=2, size=40):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = rng.integers(80, 160, (size, size, 3), dtype=np.uint8)
        m = np.zeros((size, size), bool)
        m[12:24, 10:30] = True
        out.append((img, m))
    return out


class _Probe:
    """Records the dtype of the UNet's conv_out output and how often its first ResNet block runs."""

    def __init__(self, monkeypatch):
        self.out_dtypes, self.mid_calls, self.frozen_dtypes = [], 0, set()
        from diffusers import UNet2DConditionModel

        orig = UNet2DConditionModel.forward

        def forward(unet, *a, **k):
            if not getattr(unet, "_probed", False):
                unet._probed = True
                unet.conv_out.register_forward_hook(lambda mod, i, o: self.out_dtypes.append(o.dtype))
                self.frozen_dtypes = {p.dtype for p in unet.parameters() if not p.requires_grad}
                block = unet.down_blocks[0].resnets[0]  # a wrapped forward: checkpoint's recompute skips module hooks
                inner = block.forward

                def counted(*a, **k):
                    self.mid_calls += 1
                    return inner(*a, **k)

                block.forward = counted
            return orig(unet, *a, **k)

        monkeypatch.setattr(UNet2DConditionModel, "forward", forward)


@pytest.mark.parametrize("mode", ["lora", "unet"])
def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights(tiny_latent_dir, tmp_path, monkeypatch, mode):
    probe = _Probe(monkeypatch)
    fm = finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "ft", mode=mode, steps=2, batch_size=2, lr=1e-2,
                  attention_loss=1.0, progress=False, device="cpu", precision="bf16")
    assert probe.out_dtypes and set(probe.out_dtypes) == {torch.bfloat16}  # the UNet really ran in bf16
    # LoRA: the frozen base is held in bf16 (half the memory); full UNet: nothing frozen, fp32 master weights
    assert probe.frozen_dtypes == ({torch.bfloat16} if mode == "lora" else set())
    assert fm["precision"] == "bf16" and np.isfinite(fm["final_loss"])
    curve = (tmp_path / "ft" / "training_curve.csv").read_text().splitlines()
    assert all(np.isfinite(float(x)) for x in curve[-1].split(",")[1:])
    saved = load_file(next((tmp_path / "ft").rglob("*.safetensors")))
    assert {t.dtype for t in saved.values()} == {torch.float32}  # master weights stay fp32
    assert json.loads((tmp_path / "ft" / "defectforge_finetune.json").read_text())["metrics"]["precision"] == "bf16"


def test_fp32_default_runs_in_fp32(tiny_latent_dir, tmp_path, monkeypatch):
    probe = _Probe(monkeypatch)
    fm = finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "ft", mode="lora", steps=1, batch_size=2, lr=1e-2,
                  progress=False, device="cpu")
    assert set(probe.out_dtypes) == {torch.float32} and "precision" not in fm


def test_gradient_checkpointing_recomputes_blocks_and_gives_the_same_step(tiny_latent_dir, tmp_path, monkeypatch):
    probe = _Probe(monkeypatch)
    kw = dict(mode="unet", steps=2, batch_size=2, lr=1e-2, progress=False, device="cpu", seed=3)
    finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "plain", **kw)
    plain_calls = probe.mid_calls
    probe.mid_calls = 0
    fm = finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "ckpt", gradient_checkpointing=True, **kw)
    assert fm["gradient_checkpointing"] is True
    assert probe.mid_calls == 2 * plain_calls  # the ResNet block ran again in the backward pass
    a = load_file(tmp_path / "plain" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # same maths, less memory


@pytest.mark.parametrize("kw, word", [({"precision": "fp8"}, "precision"), ({"precision": "fp16"}, "CUDA"),
                                      ({"optimizer": "sgd"}, "optimizer")])
def test_bad_memory_options_are_one_line(tiny_latent_dir, tmp_path, kw, word):
    with pytest.raises(ParamsError, match=word):
        finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "ft", mode="lora", steps=1, batch_size=2,
                 progress=False, device="cpu", **kw)


def test_adamw8bit_keeps_uint8_states(tiny_latent_dir, tmp_path, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")
    seen = []
    orig = bnb.optim.AdamW8bit.step

    def step(opt, *a, **k):
        r = orig(opt, *a, **k)
        seen.extend(v.dtype for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
        return r

    monkeypatch.setattr(bnb.optim.AdamW8bit, "step", step)
    fm = finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "ft", mode="unet", steps=2, batch_size=2, lr=1e-3,
                  progress=False, device="cpu", optimizer="adamw8bit")
    assert fm["optimizer"] == "adamw8bit" and torch.uint8 in seen


def test_the_finetune_stage_hands_its_memory_options_to_training(monkeypatch, tmp_path):
    """finetune.precision / gradient_checkpointing / optimizer reach diffusion.training.finetune."""
    import numpy as np

    import defectforge.diffusion as diffusion
    import defectforge.pipeline.finetune as stage
    from defectforge.params.file import parse_params

    seen = {}
    monkeypatch.setattr(diffusion, "finetune", lambda *a, **k: seen.update(k) or {})
    monkeypatch.setattr(stage, "read_image", lambda path: np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(stage, "read_mask", lambda path: np.ones((8, 8), bool))
    monkeypatch.setattr("defectforge.diffusion.training.file_metrics", lambda m: m)
    p = parse_params({"finetune": {"precision": "bf16", "gradient_checkpointing": True, "optimizer": "adamw8bit"}}).finetune
    stage._train_one(p, "base", tmp_path, tmp_path, "cat", "crack", [("a.png", "a_mask.png")], [], False, False)
    assert (seen["precision"], seen["gradient_checkpointing"], seen["optimizer"]) == ("bf16", True, "adamw8bit")

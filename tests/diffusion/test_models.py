"""Loading: both profiles through load_pipeline_components; offline hub id error."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from defectforge.diffusion import finetune, load_pipeline_components, pretrain, save_tiny
from defectforge.diffusion.models import config_json
from defectforge.diffusion.prompts import TextPromptEncoder
from defectforge.errors import DefectforgeError


def test_tiny_profile_size_and_layout(tiny):
    n = sum(p.numel() for p in tiny.unet.parameters())
    assert 2.5e6 < n < 3.5e6  # ~3.1 M (see configs/tiny_unet.json)
    assert tiny.resolution == 64 and tiny.inpainting and not tiny.has_decoder
    assert all(type(p).__name__ == "MaskedCrossAttnProcessor" for p in tiny.unet.attn_processors.values())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():  # the pixel profile's autoencoder is the identity: the latent is the image
        assert torch.equal(tiny.encode(x), x) and torch.equal(tiny.decode(x), x)
    # the inpainting input [z_t, m, (1 - m) z_0]: the UNet never sees the image under the mask
    m = torch.zeros(1, 1, 64, 64)
    m[..., 20:40, 20:40] = 1
    under_mask = x + m * torch.rand(x.shape, generator=g)
    beside_mask = x + (1 - m) * 0.1
    ctx, kinds = tiny.context("good")
    with torch.no_grad():
        ref, same, other = (tiny.eps(x, 500, ctx, kinds, m, cond_image=c) for c in (x, under_mask, beside_mask))
    assert torch.equal(ref, same) and not torch.allclose(ref, other)


def test_tiny_save_load_round_trip(tiny, tmp_path):
    tiny.prompts.add_defect("scratch")
    save_tiny(tiny, tmp_path / "tiny")
    back = load_pipeline_components(tmp_path / "tiny", device="cpu")
    assert back.profile == "tiny" and back.prompts.defects == ["scratch"]
    z = torch.randn(1, 3, 64, 64)
    m = torch.zeros(1, 1, 64, 64)
    m[..., 10:20, 10:20] = 1
    for comps in (tiny, back):
        ctx, kinds = comps.context("defect", "scratch")
        with torch.no_grad():
            comps._out = comps.eps(z, 10, ctx, kinds, m, cond_image=z)
    torch.testing.assert_close(tiny._out, back._out)
    assert len(back.checkpoint_sha256()) == 64


def test_pretrained_path_round_trip_with_tiny_latent_model(tiny_latent_dir):
    """A save_pretrained SD-layout directory (AutoencoderKL, CLIP) loads back unchanged."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)  # same order as build_tiny_latent_model(seed=0)
    vae = AutoencoderKL(**config_json("tiny_latent_vae")).eval()
    unet = UNet2DConditionModel(**config_json("tiny_latent_unet")).eval()
    te = CLIPTextModel(CLIPTextConfig(**config_json("tiny_latent_text_encoder"))).eval()

    comps = load_pipeline_components(str(tiny_latent_dir), device="cpu")
    assert comps.profile == "pretrained" and isinstance(comps.prompts, TextPromptEncoder)
    assert comps.resolution == 16 and comps.vae_scale_factor == 2 and not comps.inpainting and comps.has_decoder
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(comps.autoencoder.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode())
        # c_p of a base model loaded without a category: DefectDiffu's template with the generic product
        assert comps.prompts.text("bg") == "A photo of product"
        ids = comps.prompts.tokenizer("A photo of product", padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        torch.testing.assert_close(comps.prompts.embed("bg"), te(ids)[0][0])
        ctx = comps.prompts.embed("bg")[None]
        z = torch.randn(1, 4, 8, 8)
        ref = unet(z, torch.tensor([10]), encoder_hidden_states=ctx).sample
        got = comps.unet(z, torch.tensor([10]), encoder_hidden_states=ctx).sample  # no region mask: plain attention
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def test_latent_model_index_names_each_component_folder(tiny_latent_dir):
    """model_index.json is what diffusers reads to load a directory: one entry per component
    folder written, with the library and class that load it."""
    import json

    index = json.loads((tiny_latent_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "_defectforge_note" not in index
    parts = {k: v for k, v in index.items() if not k.startswith("_")}
    assert set(parts) == {d.name for d in tiny_latent_dir.iterdir() if d.is_dir()}
    assert parts["vae"] == ["diffusers", "AutoencoderKL"] and parts["tokenizer"] == ["transformers", "CLIPTokenizer"]


def test_offline_hub_id_fails_with_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DefectforgeError) as err:
        load_pipeline_components("no-such-org/no-such-model", device="cpu")
    msg = str(err.value)
    assert "\n" not in msg and msg.count(". ") == 0
    assert "no-such-org/no-such-model" in msg and "hub" in msg and "local directory" in msg


def test_hub_id_without_network_fails_fast_even_when_not_marked_offline(monkeypatch):
    """No HF_HUB_OFFLINE: the cache misses, the hub endpoint does not answer -> the same error, no retries."""
    import socket

    import defectforge.diffusion.models as models

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    probes, real_connect = [], socket.create_connection

    def connect(address, timeout=None, *a, **k):
        probes.append((address, timeout))
        return real_connect(address, timeout, *a, **k)

    downloads = []
    real_load = models._load_diffusers

    def load(name, dev, *, local, dtype, cache_only=False):
        if not cache_only:
            downloads.append(name)  # a download attempt would retry for a minute
        return real_load(name, dev, local=local, dtype=dtype, cache_only=cache_only)

    monkeypatch.setattr(socket, "create_connection", connect)
    monkeypatch.setattr(models, "_load_diffusers", load)
    with pytest.raises(DefectforgeError, match="cannot load this model from the Hugging Face hub"):
        load_pipeline_components("no-such-org/no-such-model", device="cpu")
    # "fast": one probe of the endpoint's own host and port with a short timeout, and no download attempt
    assert probes == [(("127.0.0.1", 9), 3.0)]
    assert downloads == []


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DefectforgeError, match="not found"):
        load_pipeline_components(tmp_path / "nope" / "model.bin", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DefectforgeError, match="not a model directory"):
        load_pipeline_components(tmp_path / "empty", device="cpu")


def _defects(n=2, size=72):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        img = rng.integers(80, 160, (size, size + 8, 3), dtype=np.uint8)
        m = np.zeros((size, size + 8), bool)
        m[30:40, 30:44] = True
        img[m] = 20
        out.append((img, m))
    return out


@pytest.mark.parametrize("mode", ["unet", "lora"])
def test_pretrain_then_finetune_writes_loadable_safetensors(tmp_path, mode):
    normals = [d[0] for d in _defects(2)]
    m = pretrain(normals, tmp_path / "tiny", steps=2, batch_size=2, progress=False, device="cpu")
    assert m["unet_parameters"] > 2e6 and (tmp_path / "tiny" / "training_curve.csv").is_file()
    fm = finetune(tmp_path / "tiny", _defects(), "pit", tmp_path / "ft", normals=normals, mode=mode,
                  steps=3, batch_size=4, lr=1e-2, progress=False, device="cpu")
    assert fm["mode"] == mode and fm["steps"] == 3
    assert not list((tmp_path / "ft").rglob("*.bin")) and not list((tmp_path / "ft").rglob("*.pt"))
    with open(tmp_path / "ft" / "training_curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "loss", "matching", "regulariser"] and rows[-1]["step"] == "3"
    base = load_pipeline_components(tmp_path / "tiny", device="cpu")
    ft = load_pipeline_components(tmp_path / "ft", device="cpu")
    assert ft.defect_type == "pit" and "pit" in ft.prompts.defects
    if mode == "lora":
        assert any("lora" in n for n, _ in ft.unet.named_parameters())
    z = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    ctx, kinds = base.context("good")
    with torch.no_grad():
        a = base.eps(z, 100, ctx, kinds, mask, cond_image=z)
        b = ft.eps(z, 100, ctx, kinds, mask, cond_image=z)
    assert not torch.allclose(a, b)  # the fine-tuned weights were applied
    assert base.checkpoint_sha256() != ft.checkpoint_sha256()


def test_finetune_on_the_pretrained_profile_with_lora(tiny_latent_dir, tmp_path):
    """finetune takes a diffusers SD directory; the LoRA checkpoint loads on top of its base."""
    fm = finetune(str(tiny_latent_dir), _defects(), "pit", tmp_path / "ft", mode="lora", steps=2, batch_size=2,
                  lr=1e-2, progress=False, device="cpu")
    assert fm["profile"] == "pretrained" and (tmp_path / "ft" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (tmp_path / "ft" / "prompt_encoder").exists()  # the frozen text encoder needs no new tokens
    ft = load_pipeline_components(tmp_path / "ft", device="cpu")
    assert ft.profile == "pretrained" and ft.defect_type == "pit"
    assert any("lora" in n for n, _ in ft.unet.named_parameters())
    base = load_pipeline_components(str(tiny_latent_dir), device="cpu")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 2:6] = 1
    with torch.no_grad():
        a, b = (c.eps(z, 100, *c.context("defect", "pit"), m) for c in (base, ft))
    assert not torch.allclose(a, b)  # the trained LoRA (B = 0 at initialisation) changes the prediction

"""Stable Diffusion 1.5 at full size with random weights: the shipped configs give the published
architecture (parameter counts, shapes that compose), counted on the ``meta`` device so no
memory is allocated; the nightly test writes the directory and loads it through the library."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from defectforge.diffusion.models import build_sd15_modules, character_clip_tokenizer, config_json, load_pipeline_components

# published sizes (millions) of the SD 1.5 checkpoints: runwayml/stable-diffusion-v1-5 (UNet,
# CLIP ViT-L/14 text tower, KL-f8 VAE) and runwayml/stable-diffusion-inpainting (UNet)
PUBLISHED_M = {("unet", False): 859.52, ("unet", True): 859.54, ("text_encoder", False): 123.06, ("vae", False): 83.65}
# the exact counts of those checkpoints' tensors: a 1 % band alone lets a wrong
# cross_attention_dim (1024 instead of 768: +0.74 %) through
EXACT = {("unet", False): 859_520_964, ("unet", True): 859_535_364, ("text_encoder", False): 123_060_480, ("vae", False): 83_653_863}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("part,inpainting", list(PUBLISHED_M))
def test_sd15_parameter_counts_match_published(part, inpainting):
    module = build_sd15_modules(inpainting, "meta", (part,))[part]
    assert next(module.parameters()).is_meta  # nothing allocated
    n = _count(module)
    assert abs(n / 1e6 - PUBLISHED_M[part, inpainting]) / PUBLISHED_M[part, inpainting] < 0.01, n
    assert n == EXACT[part, inpainting]


@pytest.mark.parametrize("inpainting", [False, True])
def test_sd15_shapes_compose_on_meta(inpainting):
    """A 512 px image -> 64x64x4 latent -> UNet (with the library's masked cross-attention) reading
    [C_inside, C_outside], two 77x768 text states -> 64x64x4 noise -> 512 px image, run as shapes only
    on the meta device."""
    from defectforge.diffusion.attention import install_masked_attention

    m = build_sd15_modules(inpainting, "meta")
    unet, te, vae = m["unet"], m["text_encoder"], m["vae"]
    assert unet.config.in_channels == (9 if inpainting else 4)
    assert len(unet.config.block_out_channels) == 4 and unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 512
    install_masked_attention(unet)
    cross = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) == 16  # 6 down, 1 middle, 9 up: the layers the attention maps come from
    meta = torch.device("meta")
    tok = character_clip_tokenizer(te.config.max_position_embeddings, te.config.vocab_size)
    ids = tok("a photo of a scratch", padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    assert ids.shape == (1, 77) and int(ids.max()) == te.config.vocab_size - 1  # <|endoftext|> is CLIP's 49407
    with torch.no_grad():
        states = te(ids.to(meta))[0]
        assert states.shape == (1, 77, 768)
        latent = vae.encode(torch.empty(1, 3, 512, 512, device=meta)).latent_dist.mode()
        assert latent.shape == (1, 4, 64, 64)
        region = torch.empty(1, 1, 64, 64, device=meta)
        x = torch.cat([latent, region, latent], dim=1) if inpainting else latent
        context = torch.cat([states, states], dim=1)  # the library's layout (prompts.build_context)
        kinds = torch.cat([torch.ones(77, dtype=torch.bool), torch.zeros(77, dtype=torch.bool)]).to(meta)
        kwargs = {"region_mask": region, "token_kinds": kinds, "attention_store": None}
        eps = unet(x, torch.tensor([500], device=meta), encoder_hidden_states=context, cross_attention_kwargs=kwargs).sample
        assert eps.shape == (1, 4, 64, 64)
        assert vae.decode(eps).sample.shape == (1, 3, 512, 512)


def test_sd15_scheduler_is_sds():
    from diffusers import DDIMScheduler

    s = DDIMScheduler(**config_json("sd15_scheduler"))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # "scaled_linear"
    torch.testing.assert_close(s.betas.double(), betas, rtol=1e-6, atol=1e-9)
    assert s.config.steps_offset == 1 and not s.config.set_alpha_to_one and s.config.prediction_type == "epsilon"
    assert abs(float(s.alphas_cumprod[-1]) - 0.0047) < 1e-4


@pytest.mark.slow
@pytest.mark.nightly
def test_sd15_directory_builds_and_loads(tmp_path):
    """The full-size directory (about 4.3 GB in fp32) written with save_pretrained loads through
    load_pipeline_components like a downloaded SD 1.5 checkpoint and runs one guided UNet call."""
    from defectforge.diffusion.models import build_sd15_model

    torch.set_num_threads(1)
    out = build_sd15_model(tmp_path / "sd15", seed=0)
    try:
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
        assert all(any((out / p).glob("*.safetensors")) for p in ("unet", "vae", "text_encoder"))
        comps = load_pipeline_components(out, device="cpu")
        assert comps.profile == "pretrained" and comps.resolution == 512 and not comps.inpainting
        assert comps.vae_scale_factor == 8 and comps.autoencoder.config.scaling_factor == 0.18215
        assert _count(comps.unet) == EXACT["unet", False] and _count(comps.prompts.text_encoder) == EXACT["text_encoder", False]
        assert _count(comps.autoencoder) == EXACT["vae", False]
        assert len(comps.files) == 3 and len(comps.checkpoint_sha256()) == 64
        ctx, kinds = comps.context("defect", "scratch")
        assert ctx.shape == (1, 2 * 77, 768) and kinds.shape == (2 * 77,)  # [C_inside, C_outside]
        z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))  # 256 px keeps the call short
        m = torch.zeros(1, 1, 32, 32)
        m[..., 8:20, 8:20] = 1
        with torch.no_grad():
            eps = comps.eps(z, 500, ctx, kinds, m)
        assert eps.shape == z.shape and torch.isfinite(eps).all()
    finally:
        shutil.rmtree(out)  # 4.3 GB: pytest keeps its last temporary directories


@pytest.mark.slow
@pytest.mark.nightly
def test_sd15_inpainting_bf16_directory_builds_and_loads(tmp_path):
    """``dtype=bfloat16`` writes half the bytes (about 2 GB) and loads with ``torch_dtype``; the inpainting
    UNet takes [z_t, m, (1 - m) z_0] (9 channels) through the library's guided call."""
    from defectforge.diffusion.models import build_sd15_model

    torch.set_num_threads(1)
    out = build_sd15_model(tmp_path / "sd15-inpaint", inpainting=True, seed=0, dtype=torch.bfloat16)
    try:
        assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
        size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
        assert 1.9e9 < size < 2.3e9  # 2 bytes per parameter: (859.5 + 123.1 + 83.7) M
        comps = load_pipeline_components(out, device="cpu", dtype=torch.bfloat16)
        assert comps.inpainting and comps.unet.config.in_channels == 9 and _count(comps.unet) == EXACT["unet", True]
        assert {comps.unet.dtype, comps.prompts.text_encoder.dtype, comps.autoencoder.dtype} == {torch.bfloat16}
        ctx, kinds = comps.context("defect", "scratch")
        z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        m = torch.zeros(1, 1, 32, 32, dtype=torch.bfloat16)
        m[..., 8:20, 8:20] = 1
        with torch.no_grad():
            eps = comps.eps(z, 500, ctx, kinds, m, cond_image=z)
        assert eps.shape == z.shape and eps.dtype == torch.bfloat16 and torch.isfinite(eps).all()
    finally:
        shutil.rmtree(out)

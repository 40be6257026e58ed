"""The `blended` method (AdaBLDM): bit-exact background, decoder adaptation, trimap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.errors import ParamsError
from defectforge.masks.crop import feather_radius
from defectforge.methods import get_method_class
from defectforge.methods.blended import BlendedConfig, Blended, adapt_decoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_components, save_tiny

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("pit")
    out = tmp_path_factory.mktemp("bld") / "tiny"
    save_tiny(comps, out)
    return out


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_latent_model

    return build_tiny_latent_model(tmp_path_factory.mktemp("bld-sd") / "sd")


def _inputs():
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (100, 140, 3), dtype=np.uint8)
    mask = np.zeros((100, 140), bool)
    mask[40:55, 60:72] = True
    return img, mask


def _dilate(mask, r):
    """Square (Chebyshev) dilation by r pixels: the reach of feather_mask."""
    out = mask.copy()
    p = np.pad(mask, r)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def test_registered():
    assert get_method_class("blended") is Blended


def test_outside_the_mask_bit_for_bit_tiny_profile(tiny_dir):
    """Feathered paste (default): every pixel farther than the feather's reach from the
    mask keeps its bytes, the rim is blended; feather = 0: every pixel outside the mask."""
    img, mask = _inputs()
    r = Blended.from_pretrained(tiny_dir, BlendedConfig(steps=4), device="cpu").generate(img, mask, "pit", 0)
    assert r.image.shape == img.shape and r.image.dtype == np.uint8
    reach = _dilate(r.mask, feather_radius(BlendedConfig().feather))
    assert np.array_equal(r.image[~reach], img[~reach])
    rim = reach & ~r.mask
    assert not np.array_equal(r.image[rim], img[rim])  # the seam is blended, not a hard edge
    hard = Blended.from_pretrained(tiny_dir, BlendedConfig(steps=4, feather=0), device="cpu").generate(img, mask, "pit", 0)
    assert np.array_equal(hard.image[~hard.mask], img[~hard.mask])
    assert not np.array_equal(r.image[r.mask], img[r.mask])
    assert r.metadata["decoder_adaptation"].startswith("skipped")
    assert r.attention.shape == mask.shape and r.attention[~mask].max() == 0


def test_mask_paste_keeps_the_background_bytes_latent_profile(latent_dir):
    """paste: mask (the former behaviour): only the feathered defect region changes."""
    img, mask = _inputs()
    r = Blended.from_pretrained(str(latent_dir), BlendedConfig(steps=4, adapt_steps=5, adapt_lr=1e-3, paste="mask"),
                                      device="cpu").generate(img, mask, "pit", 0)
    reach = _dilate(r.mask, feather_radius(BlendedConfig().feather))
    assert np.array_equal(r.image[~reach], img[~reach])
    ad = r.metadata["decoder_adaptation"]
    assert ad["steps"] == 5 and ad["background_mse_after"] < ad["background_mse_before"]


def test_output_is_the_adapted_decoders_crop(latent_dir, monkeypatch):
    """paste: crop (default, as AdaBLDM's test.py returns ``bg_refine``): every pixel of the
    crop box is D'(z_0) of the adapted decoder, background included; outside the box the
    image keeps its bytes. The adapted background is closer to the normal image than D(z_0)."""
    from defectforge.diffusion.sampling import paste_back, to_uint8
    from defectforge.masks.crop import CropBox, resize_image
    from defectforge.methods import blended

    seen = {}
    real = blended.adapt_decoder

    def spy(comps, z, x, defect, steps, lr, weight):
        ae, stats = real(comps, z, x, defect, steps, lr, weight)
        seen.update(comps=comps, z=z.clone(), ae=ae, defect=defect.clone())
        return ae, stats

    monkeypatch.setattr(blended, "adapt_decoder", spy)
    img, mask = _inputs()
    cfg = BlendedConfig(steps=4, adapt_steps=30, adapt_lr=1e-3)
    assert cfg.paste == "crop"
    r = Blended.from_pretrained(str(latent_dir), cfg, device="cpu").generate(img, mask, "pit", 0)
    comps, z = seen["comps"], seen["z"]
    with torch.no_grad():
        adapted = to_uint8(comps.decode(z, decoder=seen["ae"]))
        plain = to_uint8(comps.decode(z))
    box = CropBox(**r.metadata["crop_box"])
    assert np.array_equal(r.image, paste_back(img, adapted, box))
    inside_box = np.zeros(mask.shape, bool)
    inside_box[box.slices()] = True
    assert np.array_equal(r.image[~inside_box], img[~inside_box])
    assert not np.array_equal(r.image[inside_box & ~_dilate(r.mask, 3)], img[inside_box & ~_dilate(r.mask, 3)])
    # the adapted background pixels are kept, and they moved towards the normal crop
    bg = seen["defect"][0, 0].numpy() == 0
    normal = resize_image(img[box.slices()], adapted.shape[:2]).astype(int)
    err_adapted = np.abs(adapted.astype(int) - normal)[bg].mean()
    err_plain = np.abs(plain.astype(int) - normal)[bg].mean()
    assert err_adapted < 0.8 * err_plain, (err_adapted, err_plain)


def test_adaptation_loss_is_the_references():
    """L = mean((d (D'(z) - D(z)))^2) + lambda mean(((1 - d) (D'(z) - x))^2), means over all elements."""
    from defectforge.methods.blended import adaptation_loss

    g = torch.Generator().manual_seed(3)
    rec, fg, x = (torch.rand(1, 3, 8, 8, generator=g) * 2 - 1 for _ in range(3))
    d = torch.zeros(1, 1, 8, 8)
    d[..., 2:5, 3:7] = 1
    loss, inside, outside = adaptation_loss(rec, fg, x, d, 100.0)
    in_px, out_px = d.expand(1, 3, 8, 8).bool(), ~d.expand(1, 3, 8, 8).bool()
    want_in = ((rec - fg)[in_px] ** 2).sum() / rec.numel()
    want_out = ((rec - x)[out_px] ** 2).sum() / rec.numel()
    torch.testing.assert_close(inside, want_in)
    torch.testing.assert_close(outside, want_out)
    torch.testing.assert_close(loss, want_in + 100.0 * want_out)


def test_decoder_adaptation_follows_the_reference_loss(latent_dir):
    """adapt_decoder = AdamW (lr, decoder only) on the reference loss, step for step: a hand
    loop on the written-out loss gives the same decoder weights. Three steps, because the
    in-mask term has no gradient at the first step (D' = D there)."""
    from defectforge.diffusion import load_pipeline_components

    comps = load_pipeline_components(str(latent_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    z = comps.encode(x).detach() + 0.3 * torch.randn(1, 4, 8, 8, generator=g)  # an edited latent
    d = torch.zeros(1, 1, 16, 16)
    d[..., 4:10, 4:10] = 1
    before_params = [p.clone() for p in comps.autoencoder.decoder.parameters()]
    ae, stats = adapt_decoder(comps, z, x, d, steps=3, lr=1e-3, weight=100.0)

    import copy

    ref = copy.deepcopy(comps.autoencoder)
    ref.requires_grad_(False)
    ref.decoder.requires_grad_(True)
    opt = torch.optim.AdamW(ref.decoder.parameters(), lr=1e-3)
    with torch.no_grad():
        fg = comps.decode(z)
    for _ in range(3):
        rec = comps.decode(z, decoder=ref)
        loss = ((d * (rec - fg)) ** 2).mean() + 100.0 * (((1 - d) * (rec - x)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for a, b in zip(ae.decoder.parameters(), ref.decoder.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(ae.post_quant_conv.parameters(), comps.autoencoder.post_quant_conv.parameters()))
    # the shared autoencoder is untouched (the adaptation works on a copy)
    assert all(torch.equal(a, b) for a, b in zip(before_params, comps.autoencoder.decoder.parameters()))


def test_decoder_adaptation_lowers_background_error_and_keeps_the_defect(latent_dir):
    from defectforge.diffusion import load_pipeline_components

    comps = load_pipeline_components(str(latent_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    z = comps.encode(x).detach() + 0.3 * torch.randn(1, 4, 8, 8, generator=g)
    d = torch.zeros(1, 1, 16, 16)
    d[..., 4:10, 4:10] = 1
    _, stats = adapt_decoder(comps, z, x, d, steps=20, lr=1e-3, weight=100.0)
    assert stats["background_mse_after"] < 0.5 * stats["background_mse_before"]
    # lambda sets the trade: a smaller background weight lets the in-mask term hold the defect better
    _, even = adapt_decoder(comps, z, x, d, steps=20, lr=1e-3, weight=1.0)
    assert even["in_mask_drift_mse_after"] < 0.5 * stats["in_mask_drift_mse_after"], (even, stats)


def _recorded_sample(comps, monkeypatch, z0, m, steps, free, edit, seed, x=None, pixel_mask=None):
    """sample_blended with a recording stub around the UNet, the encoder and Eq. 1's noising:
    returns (result, UNet inputs, encoder inputs, [(kind, step, alpha)] per noising)."""
    from defectforge.methods import blended

    events, unet_in, enc_in = [], [], []
    real_eps, real_encode, real_add = comps.eps, comps.encode, blended.add_noise

    def eps(z, t, *a, **k):
        unet_in.append(z[0:1].clone())
        events.append("unet")
        return real_eps(z, t, *a, **k)

    def encode(img):
        enc_in.append(img.clone())
        events.append("encode")
        return real_encode(img)

    def add_noise(z, e, alpha):
        events.append(("noise", float(alpha)))
        return real_add(z, e, alpha)

    monkeypatch.setattr(comps, "eps", eps)
    monkeypatch.setattr(comps, "encode", encode)
    monkeypatch.setattr(blended, "add_noise", add_noise)
    out = blended.sample_blended(comps, z0, m, "pit", steps, 2.0, free, torch.Generator().manual_seed(seed),
                                 edit_fraction=edit, x=x, pixel_mask=pixel_mask)
    noised, done, edit_pending = [], 0, False
    for ev in events:  # an edit is encode + noise after step done-1; a blend is a noise alone before step done
        if ev == "unet":
            done += 1
        elif ev == "encode":
            edit_pending = True
        else:
            noised.append(("edit", done - 1, ev[1]) if edit_pending else ("blend", done, ev[1]))
            edit_pending = False
    return out, unet_in, enc_in, noised


def test_stages_run_at_the_references_steps(tiny_dir, monkeypatch):
    """AdaBLDM's schedule (ddim_hacked.py, N = 50, cutoff_index = 45): 26 free steps from pure
    noise, latent blending before steps 26..45 (20 steps), image editing after steps 45..49;
    here with N = 10: free 0..4, blending before 5..8 at a_t, editing after 8..9 at a_{t-1}."""
    from defectforge.diffusion import load_pipeline_components
    from defectforge.diffusion.ddim import ddim_schedule
    from defectforge.methods.blended import stage_steps

    n_free, cutoff = stage_steps(50, BlendedConfig().free_fraction, BlendedConfig().edit_fraction)
    assert (n_free, cutoff, len(range(n_free, cutoff + 1)), 50 - cutoff) == (26, 45, 20, 5)
    comps = load_pipeline_components(str(tiny_dir), device="cpu")
    z0, m = _pixel_inputs(comps)
    out, unet_in, enc_in, noised = _recorded_sample(comps, monkeypatch, z0, m, 10, 0.5, 0.2, seed=4)
    sched = ddim_schedule(comps.scheduler, 10)
    assert len(unet_in) == 10
    # z_T is the generator's first draw, not a noised normal image
    assert torch.equal(unet_in[0], torch.randn(z0.shape, generator=torch.Generator().manual_seed(4)))
    assert [(k, i) for k, i, _ in noised] == [("blend", 5), ("blend", 6), ("blend", 7), ("blend", 8), ("edit", 8), ("edit", 9)]
    for kind, i, alpha in noised:
        assert alpha == pytest.approx(sched[i].alpha_t if kind == "blend" else sched[i].alpha_prev)
    assert len(enc_in) == 2


def _pixel_inputs(comps):
    r = comps.resolution
    g = torch.Generator().manual_seed(1)
    z0 = torch.rand(1, 3, r, r, generator=g) * 1.2 - 0.6
    m = torch.zeros(1, 1, r, r)
    m[..., r // 4 : r // 2, r // 3 : 2 * r // 3] = 1
    return z0, m


def test_image_editing_pastes_the_normal_image_outside_the_mask(tiny_dir, latent_dir, monkeypatch):
    """Each editing step hands the encoder D(x0^) inside m_d and the normal crop x outside; in
    the pixel profile the last step (a_{t-1} = 1) leaves exactly x outside m_d, the sample inside."""
    from defectforge.diffusion import load_pipeline_components

    comps = load_pipeline_components(str(tiny_dir), device="cpu")
    z0, m = _pixel_inputs(comps)
    out, _, enc_in, _ = _recorded_sample(comps, monkeypatch, z0, m, 6, 0.5, 0.34, seed=2)
    outside, inside = ~m.bool().expand_as(z0), m.bool().expand_as(z0)
    assert torch.equal(out[outside], z0[outside])
    assert (out[inside] - z0[inside]).abs().mean() > 0.05
    without, _, _, _ = _recorded_sample(comps, monkeypatch, z0, m, 6, 0.5, 0.0, seed=2)
    assert (without[outside] - z0[outside]).abs().max() > 1e-3  # without the stage the background is not pinned

    monkeypatch.undo()
    lat = load_pipeline_components(str(latent_dir), device="cpu")
    r = lat.resolution
    g = torch.Generator().manual_seed(5)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=r, mode="bilinear")
    pm = torch.zeros(1, 1, r, r)
    pm[..., 4:10, 4:12] = 1
    with torch.no_grad():
        z0l = lat.encode(x)
    _, _, enc_in, noised = _recorded_sample(lat, monkeypatch, z0l, lat.latent_mask(pm), 5, 0.4, 0.4, seed=0, x=x, pixel_mask=pm)
    assert len(enc_in) == 2 and [k for k, _, _ in noised][-2:] == ["edit", "edit"]
    out_px, in_px = ~pm.bool().expand_as(x), pm.bool().expand_as(x)
    for img in enc_in:
        assert torch.equal(img[out_px], x[out_px])
        assert (img[in_px] - x[in_px]).abs().mean() > 0.05


def test_trimap_keeps_defects_on_the_object(tiny_dir):
    img = np.full((96, 96, 3), 20, np.uint8)
    img[24:72, 24:72] = 180  # object on a dark, plain background
    mask = np.zeros((96, 96), bool)
    mask[14:34, 40:50] = True  # starts off the object
    r = Blended.from_pretrained(tiny_dir, BlendedConfig(steps=3), device="cpu").generate(img, mask, "pit", 0)
    assert r.metadata["mask_pixels_off_object"] > 0
    assert not r.mask[14:22].any() and (r.mask <= mask).all()
    reach = _dilate(r.mask, feather_radius(BlendedConfig().feather))
    assert np.array_equal(r.image[~reach], img[~reach])


def test_same_seed_same_output(tiny_dir):
    img, mask = _inputs()
    method = Blended.from_pretrained(tiny_dir, BlendedConfig(steps=2), device="cpu")
    assert np.array_equal(method.generate(img, mask, "pit", 9).image, method.generate(img, mask, "pit", 9).image)


def test_bad_config():
    with pytest.raises(ParamsError, match="blended.free_fraction"):
        BlendedConfig(free_fraction=1.5)


def test_grayscale_sources_stay_grayscale(tiny_dir):
    img, mask = _inputs()
    gray = np.repeat(img[..., :1], 3, axis=2)
    r = Blended.from_pretrained(tiny_dir, BlendedConfig(steps=2), device="cpu").generate(gray, mask, "pit", 0)
    assert r.metadata["grayscale_output"]
    assert np.array_equal(r.image[..., 0], r.image[..., 1]) and np.array_equal(r.image[..., 1], r.image[..., 2])


@pytest.fixture(scope="module")
def control_dir(tiny_dir, tmp_path_factory):
    """A tiny fine-tune with the trimap ControlNet (2 UNet steps, then 4 ControlNet steps)."""
    from defectforge.diffusion.training import finetune

    img = np.full((64, 64, 3), 20, np.uint8)
    img[8:56, 8:56] = 170  # an object on a dark background
    mask = np.zeros((64, 64), bool)
    mask[24:34, 26:40] = True
    img[mask] = 60
    out = tmp_path_factory.mktemp("bld-cn") / "ft"
    m = finetune(tiny_dir, [(img, mask)], "pit", out, steps=2, batch_size=2, lr=1e-3, trimap_control=True, trimap_control_steps=4,
                 device="cpu", progress=False)
    return out, m


def test_trimap_controlnet_is_trained_and_saved(control_dir):
    from defectforge.diffusion import load_pipeline_components
    from defectforge.diffusion.control import build_trimap_controlnet, trimap_condition

    out, metrics = control_dir
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").exists() and metrics["trimap_control_steps"] == 4
    comps = load_pipeline_components(str(out), device="cpu")
    assert comps.controlnet is not None and any("controlnet" in str(f) for f in comps.files)
    fresh = build_trimap_controlnet(comps.unet, comps.vae_scale_factor)
    moved = [n for (n, a), b in zip(comps.controlnet.named_parameters(), fresh.parameters()) if not torch.equal(a, b)]
    assert any(n.startswith("controlnet_down_blocks") for n in moved)  # the zero convolutions left zero
    assert any(n.startswith("controlnet_cond_embedding") for n in moved)
    # the trimap changes the UNet's prediction: defect here vs defect there vs none
    r = comps.resolution
    g = torch.Generator().manual_seed(0)
    z, x0 = torch.randn(1, 3, r, r, generator=g), torch.rand(1, 3, r, r, generator=g) * 2 - 1
    m = torch.zeros(1, 1, r, r)
    m[..., 20:40, 20:40] = 1
    ctx, kinds = comps.context("defect", "pit")
    t1 = torch.ones(1, 1, r, r)
    t1[..., 20:40, 20:40] = 2
    t2 = torch.ones(1, 1, r, r)
    t2[..., 4:16, 40:60] = 2
    with torch.no_grad():
        e = {k: comps.eps(z, 500, ctx, kinds, m, cond_image=x0, control=None if c is None else trimap_condition(c, r))
             for k, c in (("none", None), ("here", t1), ("there", t2))}
    assert (e["here"] - e["none"]).abs().max() > 1e-6
    assert (e["here"] - e["there"]).abs().max() > 1e-6


def test_generate_passes_the_trimap_through_the_controlnet(control_dir, monkeypatch):
    from defectforge.diffusion.control import trimap_condition

    out, _ = control_dir
    img = np.full((96, 96, 3), 20, np.uint8)
    img[16:80, 16:80] = 170
    mask = np.zeros((96, 96), bool)
    mask[10:40, 40:50] = True  # partly off the object: the trimap clips it
    method = Blended.from_pretrained(str(out), BlendedConfig(steps=4, feather=0), device="cpu")
    comps = method.models.get("pit")
    seen = []
    real = comps.controlnet.forward

    def spy(x, t, encoder_hidden_states=None, controlnet_cond=None, **kw):
        seen.append(controlnet_cond.clone())
        return real(x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond, **kw)

    monkeypatch.setattr(comps.controlnet, "forward", spy)
    r = method.generate(img, mask, "pit", 0)
    assert r.metadata["trimap_control"] and len(seen) == 4  # one ControlNet call per DDIM step
    cond = seen[0][0, 0]
    assert set(torch.unique(cond).tolist()) <= {0.0, 0.5, 1.0} and (cond == 1.0).any() and (cond == 0.5).any()
    from defectforge.masks.crop import CropBox
    from defectforge.masks.trimap import make_trimap

    ys, xs = CropBox(**r.metadata["crop_box"]).slices()
    want = trimap_condition(torch.from_numpy(make_trimap(img, mask)[ys, xs].astype(np.float32))[None, None], comps.resolution)
    assert torch.equal(seen[0][:1], want.expand_as(seen[0][:1]))
    monkeypatch.undo()
    without = Blended.from_pretrained(str(out), BlendedConfig(steps=4, feather=0), device="cpu")
    without.models.get("pit").controlnet = None
    plain = without.generate(img, mask, "pit", 0)
    assert not np.array_equal(plain.image, r.image)
    # blended.control: false is the same ablation on a fine-tune that has a ControlNet
    off = Blended.from_pretrained(str(out), BlendedConfig(steps=4, feather=0, control=False), device="cpu")
    seen.clear()
    monkeypatch.setattr(off.models.get("pit").controlnet, "forward", spy)
    r_off = off.generate(img, mask, "pit", 0)
    assert not seen and not r_off.metadata["trimap_control"] and np.array_equal(r_off.image, plain.image)


def test_trimap_controlnet_for_the_latent_profile(latent_dir):
    """The pretrained profile's ControlNet (diffusers' from_unet): the condition at pixel size
    lands on the latent grid through the conditioning embedding (here 2x down)."""
    from defectforge.diffusion import load_pipeline_components
    from defectforge.diffusion.control import build_trimap_controlnet, control_residuals

    comps = load_pipeline_components(str(latent_dir), device="cpu")
    cn = build_trimap_controlnet(comps.unet, comps.vae_scale_factor)
    z = torch.randn(1, 4, 8, 8)
    ctx = comps.context("defect", "pit")[0]
    down, mid = control_residuals(cn, z, torch.tensor([10]), ctx, torch.rand(1, 1, 16, 16))
    assert down[0].shape[-1] == 8 and all(float(d.abs().max()) == 0 for d in down)  # zero convolutions: no effect untrained
    # an SD-layout UNet with a middle block goes through ControlNetModel.from_unet itself
    from diffusers import UNet2DConditionModel

    from defectforge.diffusion.models import config_json

    sd_like = UNet2DConditionModel(**{**config_json("tiny_latent_unet"), "mid_block_type": "UNetMidBlock2DCrossAttn"})
    cn = build_trimap_controlnet(sd_like, 8)
    assert torch.equal(cn.mid_block.resnets[0].conv1.weight, sd_like.mid_block.resnets[0].conv1.weight)
    down, mid = control_residuals(cn, z, torch.tensor([10]), ctx, torch.rand(1, 1, 64, 64))
    assert down[0].shape[-1] == 8 and mid.shape[-1] == 4


def test_pretrained_profile_trains_and_uses_its_trimap_controlnet(latent_dir, tmp_path):
    """The latent (Stable-Diffusion-layout) profile end to end: finetune trains and saves the
    ControlNet, generate loads it and feeds the trimap, and it changes the sample."""
    from defectforge.diffusion.training import finetune

    img = np.full((64, 64, 3), 20, np.uint8)
    img[8:56, 8:56] = 170
    mask = np.zeros((64, 64), bool)
    mask[24:34, 26:40] = True
    img[mask] = 60
    out = tmp_path / "ft"
    m = finetune(str(latent_dir), [(img, mask)], "pit", out, steps=1, batch_size=2, lr=1e-3, trimap_control=True,
                 trimap_control_steps=3, device="cpu", progress=False)
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file() and m["trimap_control_steps"] == 3
    cfg = dict(steps=3, feather=0, adapt_steps=1)
    on = Blended.from_pretrained(str(out), BlendedConfig(**cfg), device="cpu")
    assert on.models.get("pit").controlnet is not None
    calls = []
    real = on.models.get("pit").controlnet.forward

    def spy(*a, **kw):
        calls.append(kw.get("controlnet_cond").shape)
        return real(*a, **kw)

    on.models.get("pit").controlnet.forward = spy
    r_on = on.generate(img, mask, "pit", 0)
    assert r_on.metadata["trimap_control"] and r_on.metadata["profile"] == "pretrained" and len(calls) == 3
    assert calls[0][-1] == on.models.get("pit").resolution  # the trimap at the crop's pixel size
    r_off = Blended.from_pretrained(str(out), BlendedConfig(**cfg, control=False), device="cpu").generate(img, mask, "pit", 0)
    assert not r_off.metadata["trimap_control"] and not np.array_equal(r_on.image, r_off.image)

"""The `blended` method (AdaBLDM): bit-exact background, decoder adaptation, trimap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.errors import ParamsError
from defectforge.masks.crop import feather_radius
from defectforge.methods import get_method_class
from defectforge.methods.blended import BlendedConfig, BlendedMethod, adapt_decoder

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
    assert get_method_class("blended") is BlendedMethod


def test_outside_the_mask_bit_for_bit_tiny_profile(tiny_dir):
    """Feathered paste (default): every pixel farther than the feather's reach from the
    mask keeps its bytes, the rim is blended; feather = 0: every pixel outside the mask."""
    img, mask = _inputs()
    r = BlendedMethod.from_pretrained(tiny_dir, BlendedConfig(steps=4), device="cpu").generate(img, mask, "pit", 0)
    assert r.image.shape == img.shape and r.image.dtype == np.uint8
    reach = _dilate(r.mask, feather_radius(BlendedConfig().feather))
    assert np.array_equal(r.image[~reach], img[~reach])
    rim = reach & ~r.mask
    assert not np.array_equal(r.image[rim], img[rim])  # the seam is blended, not a hard edge
    hard = BlendedMethod.from_pretrained(tiny_dir, BlendedConfig(steps=4, feather=0), device="cpu").generate(img, mask, "pit", 0)
    assert np.array_equal(hard.image[~hard.mask], img[~hard.mask])
    assert not np.array_equal(r.image[r.mask], img[r.mask])
    assert r.metadata["decoder_adaptation"].startswith("skipped")
    assert r.attention.shape == mask.shape and r.attention[~mask].max() == 0


def test_outside_the_mask_bit_for_bit_latent_profile_with_adaptation(latent_dir):
    img, mask = _inputs()
    r = BlendedMethod.from_pretrained(str(latent_dir), BlendedConfig(steps=4, adapt_steps=5, adapt_lr=1e-3), device="cpu").generate(img, mask, "pit", 0)
    reach = _dilate(r.mask, feather_radius(BlendedConfig().feather))
    assert np.array_equal(r.image[~reach], img[~reach])
    ad = r.metadata["decoder_adaptation"]
    assert ad["steps"] == 5 and ad["background_mse_after"] < ad["background_mse_before"]


def test_decoder_adaptation_lowers_background_error(latent_dir):
    from defectforge.diffusion import load_pipeline_components

    comps = load_pipeline_components(str(latent_dir), device="cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    z = comps.encode(x).detach() + 0.3 * torch.randn(1, 4, 8, 8, generator=g)  # an edited latent
    bg = torch.ones(1, 1, 16, 16)
    bg[..., 4:10, 4:10] = 0
    before_params = [p.clone() for p in comps.autoencoder.decoder.parameters()]
    ae, before, after = adapt_decoder(comps, z, x, bg, steps=10, lr=1e-3)
    assert after < 0.9 * before
    # the shared autoencoder is untouched (the adaptation works on a copy)
    assert all(torch.equal(a, b) for a, b in zip(before_params, comps.autoencoder.decoder.parameters()))


def test_trimap_keeps_defects_on_the_object(tiny_dir):
    img = np.full((96, 96, 3), 20, np.uint8)
    img[24:72, 24:72] = 180  # object on a dark, plain background
    mask = np.zeros((96, 96), bool)
    mask[14:34, 40:50] = True  # starts off the object
    r = BlendedMethod.from_pretrained(tiny_dir, BlendedConfig(steps=3), device="cpu").generate(img, mask, "pit", 0)
    assert r.metadata["mask_pixels_off_object"] > 0
    assert not r.mask[14:22].any() and (r.mask <= mask).all()
    reach = _dilate(r.mask, feather_radius(BlendedConfig().feather))
    assert np.array_equal(r.image[~reach], img[~reach])


def test_same_seed_same_output(tiny_dir):
    img, mask = _inputs()
    method = BlendedMethod.from_pretrained(tiny_dir, BlendedConfig(steps=2), device="cpu")
    assert np.array_equal(method.generate(img, mask, "pit", 9).image, method.generate(img, mask, "pit", 9).image)


def test_bad_config():
    with pytest.raises(ParamsError, match="blended.free_fraction"):
        BlendedConfig(free_fraction=1.5)


def test_grayscale_sources_stay_grayscale(tiny_dir):
    img, mask = _inputs()
    gray = np.repeat(img[..., :1], 3, axis=2)
    r = BlendedMethod.from_pretrained(tiny_dir, BlendedConfig(steps=2), device="cpu").generate(gray, mask, "pit", 0)
    assert r.metadata["grayscale_output"]
    assert np.array_equal(r.image[..., 0], r.image[..., 1]) and np.array_equal(r.image[..., 1], r.image[..., 2])

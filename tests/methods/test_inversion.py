"""The `inversion` method (DDIM inversion with disentangled background) end to end,
with untrained tiny models: shapes, paste-back, determinism, both profiles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.errors import DefectforgeError, ParamsError
from defectforge.masks.refine import refine_mask
from defectforge.methods import get_method_class
from defectforge.methods.inversion import InversionConfig, Inversion

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_components, save_tiny

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("crack")
    out = tmp_path_factory.mktemp("inv") / "tiny"
    save_tiny(comps, out)
    return out


@pytest.fixture(scope="module")
def latent_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_latent_model

    return build_tiny_latent_model(tmp_path_factory.mktemp("inv-sd") / "sd")


def _inputs(h=120, w=160):
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), bool)
    mask[50:62, 70:90] = True
    return img, mask


def _outside(box, shape):
    out = np.ones(shape, bool)
    out[box["top"] : box["top"] + box["height"], box["left"] : box["left"] + box["width"]] = False
    return out


def test_registered():
    assert get_method_class("inversion") is Inversion


def test_outside_the_crop_is_byte_identical_and_result_is_well_formed(tiny_dir):
    img, mask = _inputs()
    method = Inversion.from_pretrained(tiny_dir, InversionConfig(steps=3, background="sampled"), device="cpu")
    r = method.generate(img, mask, "crack", seed=1)
    assert r.image.dtype == np.uint8 and r.image.shape == img.shape
    assert np.array_equal(r.mask, mask)
    out = _outside(r.metadata["crop_box"], mask.shape)
    assert np.array_equal(r.image[out], img[out])
    assert not np.array_equal(r.image[mask], img[mask])
    assert r.attention.dtype == np.float32 and r.attention.shape == mask.shape
    assert r.attention.min() >= 0 and r.attention.max() <= 1 and r.attention[out].max() == 0
    assert not (refine_mask(r.attention, mask) & ~mask).any()  # Eq. 13 on the method's output
    assert r.metadata["profile"] == "tiny" and r.metadata["config"]["steps"] == 3
    assert len(method.checkpoint_sha256) == 64


def test_inverted_background_keeps_the_crop_outside_the_mask(tiny_dir):
    """background="inverted", identity autoencoder, crop at model size, hard mask: every
    pixel outside the mask comes back with its own bytes even with paste="crop"."""
    img, mask = _inputs()
    cfg = InversionConfig(steps=2, paste="crop", feather=0)
    r = Inversion.from_pretrained(tiny_dir, cfg, device="cpu").generate(img, mask, "crack", 3)
    assert r.metadata["crop_box"]["height"] == 64
    assert np.array_equal(r.image[~mask], img[~mask])


def test_paste_mask_keeps_every_pixel_outside_the_mask(tiny_dir):
    img, mask = _inputs()
    cfg = InversionConfig(steps=2, paste="mask", background="sampled", feather=0)
    r = Inversion.from_pretrained(tiny_dir, cfg, device="cpu").generate(img, mask, "crack", 3)
    assert np.array_equal(r.image[~mask], img[~mask])


def test_feathered_paste_keeps_every_pixel_beyond_its_reach(tiny_dir):
    """Default feather: the rim (within ceil(2 sigma) px of the mask) is blended, every
    pixel beyond it keeps its bytes, also with the "noised" defect-branch background."""
    from defectforge.masks.crop import feather_radius

    img, mask = _inputs()
    for cfg in (InversionConfig(steps=2, background="sampled"), InversionConfig(steps=2, defect_background="noised")):
        r = Inversion.from_pretrained(tiny_dir, cfg, device="cpu").generate(img, mask, "crack", 3)
        reach = mask.copy()
        k = feather_radius(cfg.feather)
        reach[50 - k : 62 + k, 70 - k : 90 + k] = True  # the rectangle mask dilated by k
        assert np.array_equal(r.image[~reach], img[~reach])
        rim = reach & ~mask
        assert not np.array_equal(r.image[rim], img[rim])


def test_same_seed_same_output_other_seed_other_defect(tiny_dir):
    img, mask = _inputs()
    method = Inversion.from_pretrained(tiny_dir, InversionConfig(steps=2), device="cpu")
    a, b, c = (method.generate(img, mask, "crack", s).image for s in (5, 5, 6))
    assert np.array_equal(a, b) and not np.array_equal(a[mask], c[mask])


def _beyond_reach(mask, sigma):
    """Pixels farther than the feather's reach from the mask (a box-shaped dilation)."""
    from scipy.ndimage import binary_dilation

    from defectforge.masks.crop import feather_radius

    k = feather_radius(sigma)
    return ~binary_dilation(mask, np.ones((2 * k + 1, 2 * k + 1), bool))


def test_whole_image_mode_and_small_images(tiny_dir):
    """crop=False: the whole 40x50 image is resampled to the model's 64 px and back, yet the
    mask paste writes only the mask and its feathered rim; the defect is painted in the mask."""
    img, mask = _inputs(40, 50)
    mask[:] = False
    mask[10:20, 10:20] = True
    method = Inversion.from_pretrained(tiny_dir, InversionConfig(steps=2, crop=False), device="cpu")
    r = method.generate(img, mask, "crack", 0)
    assert r.image.shape == img.shape and r.metadata["crop_box"] == {"top": 0, "left": 0, "height": 40, "width": 50}
    far = _beyond_reach(mask, method.config.feather)
    assert far.sum() > 1500 and np.array_equal(r.image[far], img[far])
    changed = np.abs(r.image[mask].astype(int) - img[mask].astype(int)).max(-1)
    assert (changed > 0).mean() > 0.9


def test_pretrained_profile_through_the_same_code(latent_dir):
    img, mask = _inputs()
    method = Inversion.from_pretrained(str(latent_dir), InversionConfig(steps=3), device="cpu")
    r = method.generate(img, mask, "scratch", seed=0)  # the text encoder knows any defect name
    assert r.metadata["profile"] == "pretrained" and r.metadata["resolution"] == 16
    box = r.metadata["crop_box"]
    assert box["height"] == 30  # 1.5 x the 20-px defect, larger than the 16-px model
    assert np.array_equal(r.image[_outside(box, mask.shape)], img[_outside(box, mask.shape)])
    far = _beyond_reach(mask, method.config.feather)  # inside the box too: the paste writes the mask only
    assert np.array_equal(r.image[far], img[far])
    again, other = (method.generate(img, mask, "scratch", seed=s).image for s in (0, 1))
    assert np.array_equal(again, r.image)  # deterministic under its seed ...
    assert not np.array_equal(other[mask], r.image[mask])  # ... and Theorem 1's noise follows the seed


def test_bad_config_and_unknown_defect(tiny_dir):
    with pytest.raises(ParamsError, match="inversion.paste"):
        InversionConfig(paste="everywhere")
    with pytest.raises(ParamsError, match="inversion.background"):
        InversionConfig(background="both")
    with pytest.raises(ParamsError, match="inversion.steps"):
        InversionConfig(steps=0)
    with pytest.raises(ParamsError, match="inversion.defect_background"):
        InversionConfig(defect_background="clean")
    with pytest.raises(ParamsError, match="inversion.feather"):
        InversionConfig(feather=-1)
    img, mask = _inputs()
    with pytest.raises(DefectforgeError, match="no learned tokens"):
        Inversion.from_pretrained(tiny_dir, InversionConfig(steps=1), device="cpu").generate(img, mask, "dent", 0)
    with pytest.raises(DefectforgeError, match="no fine-tuned checkpoint"):
        Inversion.from_pretrained({"crack": tiny_dir}, InversionConfig(steps=1), device="cpu").generate(img, mask, "dent", 0)

"""Batched generation (``generate_batch``): each sample keeps its own inputs and generator.

A batched UNet call differs from batch 1 only in floating-point sums (measured on the tiny
UNet: max |eps| difference 2.5e-6), so a batched sample must equal its batch-1 bytes up to
a few uint8 levels on a few pixels (the tolerance the generate stage documents), must not
depend on its place in the batch, and must draw its noise from its own generator.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.methods.base import BatchItem
from defectforge.methods.defectdiffu.training import defectdiffu_hooks
from defectforge.methods.anomalydiffusion.config import AnomalyDiffusionConfig
from defectforge.methods.blended import BlendedConfig
from defectforge.methods.defectdiffu.config import DefectDiffuConfig
from defectforge.methods.inversion import InversionConfig

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_components, save_tiny

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("pit")
    comps.prompts.add_null()  # DefectDiffu's null condition (Eq. 4)
    out = tmp_path_factory.mktemp("batched") / "tiny"
    save_tiny(comps, out)
    return out


@pytest.fixture(scope="module")
def ad_dir(tiny_dir, tmp_path_factory):
    from defectforge.methods.anomalydiffusion import fit_anomaly_embedding

    rng = np.random.default_rng(0)
    img = rng.integers(80, 120, (48, 48, 3), dtype=np.uint8)
    m = np.zeros((48, 48), bool)
    m[20:28, 10:30] = True
    img[m] = 20
    ft = tmp_path_factory.mktemp("batched-ad") / "pit"
    fit_anomaly_embedding(tiny_dir, [(img, m)], "pit", ft / "anomaly_embedding", device="cpu", steps=2, batch_size=2)
    return ft


def _items(n=3):
    """Normal images as the stage sees them (uint8, a grayscale one among them), masks at different places."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = rng.integers(60, 200, (100, 140, 3), dtype=np.uint8)
        if i % 2:
            img = np.repeat(img[..., :1], 3, axis=2)
        mask = np.zeros((100, 140), bool)
        mask[30 + 5 * i : 45 + 5 * i, 50 + 7 * i : 64 + 7 * i] = True
        out.append(BatchItem(img, mask, "pit", 11 + i))
    return out


def _methods(tiny_dir, ad_dir):
    from defectforge.methods.anomalydiffusion import AnomalyDiffusion
    from defectforge.methods.blended import Blended
    from defectforge.methods.defectdiffu import DefectDiffu
    from defectforge.methods.inversion import Inversion

    return {
        "blended": Blended.from_pretrained(tiny_dir, BlendedConfig(steps=5, edit_fraction=0.2)),
        "anomalydiffusion": AnomalyDiffusion.from_pretrained({"pit": str(ad_dir)}, AnomalyDiffusionConfig(steps=5)),
        # Eq. 6's noised background draws from each sample's generator in every step, besides Theorem 1's noise
        "inversion": Inversion.from_pretrained(tiny_dir, InversionConfig(steps=5, defect_background="noised")),
        # the mask is the sample's own attention rows, thresholded inside its own target mask
        "defectdiffu": DefectDiffu.from_pretrained(tiny_dir, DefectDiffuConfig(steps=5, attention_fraction=0.4)),
    }


ALL = ["blended", "anomalydiffusion", "inversion", "defectdiffu"]


@pytest.mark.parametrize("name", ALL)
def test_batched_samples_equal_batch_one_within_the_tolerance(tiny_dir, ad_dir, name):
    method = _methods(tiny_dir, ad_dir)[name]
    items = _items()
    one = [method.generate(it.image, it.mask, it.defect, it.seed) for it in items]
    batch = method.generate_batch(items)
    for a, b, it in zip(one, batch, items):
        diff = np.abs(a.image.astype(int) - b.image.astype(int))
        assert diff.max() <= 2 and (diff > 0).any(-1).sum() <= 0.01 * it.mask.sum(), (name, diff.max(), (diff > 0).sum())
        if method.own_mask:  # a mask thresholded from the attention: a pixel at the threshold may flip
            assert (a.mask != b.mask).sum() <= 0.01 * it.mask.sum() and a.metadata["mask_threshold"] == pytest.approx(b.metadata["mask_threshold"], abs=1e-4)
        else:
            assert np.array_equal(a.mask, b.mask)
        if a.attention is not None:
            assert np.abs(a.attention - b.attention).max() < 1e-4
    # the samples differ from each other: each used its own image, mask and seed
    assert not np.array_equal(batch[0].image, batch[2].image)


@pytest.mark.parametrize("name", ALL)
def test_a_sample_does_not_depend_on_its_place_or_its_neighbours(tiny_dir, ad_dir, name):
    """Each sample draws from its own generator: reordering the batch or replacing a
    neighbour (other seed) leaves a sample's bytes exactly as they were."""
    method = _methods(tiny_dir, ad_dir)[name]
    a, b, c = _items()
    first = method.generate_batch([a, b, c])
    swapped = method.generate_batch([c, a, b])
    other = method.generate_batch([BatchItem(b.image, b.mask, "pit", 99), a, c])
    assert np.array_equal(first[0].image, swapped[1].image) and np.array_equal(first[0].image, other[1].image)
    assert np.array_equal(first[2].image, swapped[0].image) and np.array_equal(first[2].image, other[2].image)
    for x, y in ((first[0], swapped[1]), (first[0], other[1]), (first[2], swapped[0]), (first[2], other[2])):
        assert np.array_equal(x.mask, y.mask)  # the attention and the mask read from it follow their sample too
        assert (x.attention is None) == (y.attention is None) and (x.attention is None or np.array_equal(x.attention, y.attention))
    assert not np.array_equal(first[1].image, other[0].image)  # the replaced seed did change its own sample


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    """A TDIA fine-tune with DefectDiffu's mask generation module (Sec. 3.4), trained a few steps."""
    from defectforge.diffusion.training import finetune, pretrain

    d = tmp_path_factory.mktemp("batched-module")
    rng = np.random.default_rng(0)
    normal = rng.integers(90, 150, (64, 64, 3), dtype=np.uint8)
    defect, m = normal.copy(), np.zeros((64, 64), bool)
    m[24:40, 20:44] = True
    defect[m] = 30
    pretrain([normal], d / "tiny", steps=2, batch_size=2, progress=False, device="cpu")
    finetune(d / "tiny", [(defect, m)], "pit", d / "ft", normals=[normal], steps=3, batch_size=2, progress=False, device="cpu", hooks=defectdiffu_hooks(tdia=True, mask_module=1.0, cond_dropout_product=0.2))
    return d / "ft"


@pytest.mark.parametrize("source", ["attention", "module"])
def test_defectdiffu_refined_masks_are_each_samples_own(tiny_dir, module_dir, source):
    """Each sample's attention (the share of its eps(c_d, 0) row, or M_pre from its token maps)
    and the mask thresholded from it equal its batch-1 ones, in whatever order the batch holds it."""
    from defectforge.methods.defectdiffu import DefectDiffu

    folder = tiny_dir if source == "attention" else module_dir
    method = DefectDiffu.from_pretrained(str(folder), DefectDiffuConfig(steps=4, attention_fraction=0.5, mask_source=source))
    items = _items()
    one = [method.generate(it.image, it.mask, it.defect, it.seed) for it in items]
    batch = method.generate_batch(items[::-1])[::-1]
    for a, b, it in zip(one, batch, items):
        assert a.metadata["mask_origin"] == b.metadata["mask_origin"] == f"defectdiffu-{source}"
        assert np.abs(a.attention - b.attention).max() < 1e-4
        assert (a.mask != b.mask).sum() <= 0.01 * it.mask.sum()
        assert b.mask.any() and not (b.mask & ~it.mask).any()  # inside its own target mask
        assert a.metadata["mask_threshold"] == pytest.approx(b.metadata["mask_threshold"], abs=1e-4)
    # the samples' maps are their own: no two samples share a map or a mask
    for i in range(3):
        for j in range(i + 1, 3):
            assert not np.allclose(batch[i].attention, batch[j].attention, atol=1e-3)
            assert not np.array_equal(batch[i].mask, batch[j].mask)

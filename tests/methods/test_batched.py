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

from defectforge.config import AnomalyDiffusionConfig, BlendedConfig
from defectforge.methods.base import BatchItem

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_components, save_tiny

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("pit")
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
    from defectforge.methods.anomalydiffusion import AnomalyDiffusionMethod
    from defectforge.methods.blended import BlendedMethod

    return {
        "blended": BlendedMethod.from_pretrained(tiny_dir, BlendedConfig(steps=5, edit_fraction=0.2)),
        "anomalydiffusion": AnomalyDiffusionMethod.from_pretrained({"pit": str(ad_dir)}, AnomalyDiffusionConfig(steps=5)),
    }


@pytest.mark.parametrize("name", ["blended", "anomalydiffusion"])
def test_batched_samples_equal_batch_one_within_the_tolerance(tiny_dir, ad_dir, name):
    method = _methods(tiny_dir, ad_dir)[name]
    items = _items()
    one = [method.generate(it.image, it.mask, it.defect, it.seed) for it in items]
    batch = method.generate_batch(items)
    for a, b, it in zip(one, batch, items):
        diff = np.abs(a.image.astype(int) - b.image.astype(int))
        assert diff.max() <= 2 and (diff > 0).any(-1).sum() <= 0.01 * it.mask.sum(), (name, diff.max(), (diff > 0).sum())
        assert np.array_equal(a.mask, b.mask)
        if a.attention is not None:
            assert np.abs(a.attention - b.attention).max() < 1e-4
    # the samples differ from each other: each used its own image, mask and seed
    assert not np.array_equal(batch[0].image, batch[2].image)


@pytest.mark.parametrize("name", ["blended", "anomalydiffusion"])
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
    assert not np.array_equal(first[1].image, other[0].image)  # the replaced seed did change its own sample

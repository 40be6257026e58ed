"""x0^ bounded to the real defects' value range inside the mask (``real_range``, issue 8:
the built-in brick holes' floors reached pure black, which no real hole does).

Untrained tiny models paint far outside any real range, so they show the bound working:
with it every in-mask pixel stays within the real defects' quantiles, without it they do not.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.diffusion.ddim import bound_eps, predict_x0, range_bounds
from defectforge.methods import get_method_class
from defectforge.methods.base import real_value_range

torch.set_num_threads(1)

LO, HI = 90, 140  # the real defects' in-mask values in these tests


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from defectforge.diffusion import build_tiny_components, save_tiny

    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("hole")
    comps.prompts.add_null()  # DefectDiffu's Eq. 4 needs the null condition
    out = tmp_path_factory.mktemp("range") / "tiny"
    save_tiny(comps, out)
    return out


def _reals(n=3):
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        img = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)  # outside the mask: anything
        mask = np.zeros((48, 48), bool)
        mask[10:30, 12:28] = True
        img[mask] = rng.integers(LO, HI + 1, (int(mask.sum()), 3), dtype=np.uint8)
        out.append((img, mask))
    return out


def test_real_value_range_reads_only_in_mask_pixels_per_channel():
    reals = _reals()
    lo, hi = real_value_range(reals, 0.0)
    assert lo.tolist() == [LO] * 3 and hi.tolist() == [HI] * 3
    grey = [(img[..., 0], m) for img, m in reals]  # 2-D grey images are read as 3 equal channels
    assert real_value_range(grey, 0.0)[0].tolist() == [LO] * 3
    assert real_value_range([(reals[0][0], np.zeros((48, 48), bool))], 0.0) is None  # no mask pixel: no range


def test_range_bounds_by_hand():
    w = torch.tensor([[[[1.0, 0.5, 0.0]]]])  # inside, feathered edge, outside
    lo, hi = range_bounds(torch.tensor([-0.5, -0.4, -0.3]), torch.tensor([0.2, 0.3, 0.4]), w)
    assert lo.shape == (1, 3, 1, 3)
    # lo_map = -1 + w (lo + 1), hi_map = 1 - w (1 - hi)
    torch.testing.assert_close(lo[0, 0, 0], torch.tensor([-0.5, -0.75, -1.0]))
    torch.testing.assert_close(hi[0, 2, 0], torch.tensor([0.4, 0.7, 1.0]))


def test_bound_eps_with_maps_clamps_x0_pixel_by_pixel():
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(1, 3, 4, 4, generator=g) * 2, torch.randn(1, 3, 4, 4, generator=g)
    alpha = 0.4
    w = torch.zeros(1, 1, 4, 4)
    w[..., :2, :] = 1.0
    lo, hi = range_bounds(torch.full((3,), -0.2), torch.full((3,), 0.1), w)
    x0 = predict_x0(z, bound_eps(z, eps, alpha, (lo, hi)), alpha)
    expected = predict_x0(z, eps, alpha)
    expected = torch.where(w.bool().expand_as(expected), expected.clamp(-0.2, 0.1), expected.clamp(-1, 1))
    torch.testing.assert_close(x0, expected)


@pytest.mark.parametrize("colour", [(200, 200, 200), (200, 150, 120)])  # grey steps; chroma steps (brick-like)
@pytest.mark.parametrize("name", ["inversion", "blended", "defectdiffu"])
def test_generated_defect_stays_in_the_real_range_inside_the_mask(tiny_dir, name, colour):
    cls = get_method_class(name)
    img = np.full((64, 64, 3), colour, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:44, 18:46] = True
    inner = np.zeros_like(mask)
    inner[24:40, 22:42] = True  # away from the feathered rim, where the source is blended in
    extra = {"trimap": False, "adapt_steps": 0} if name == "blended" else {}
    if name == "defectdiffu":
        extra["mask_source"] = "target"

    def run(real_range: bool) -> np.ndarray:
        cfg = cls.config_class(steps=4, real_range=real_range, real_range_q=0.0, **extra)
        method = cls.from_pretrained(tiny_dir, cfg, device="cpu")
        method.prepare("part", "hole", _reals())
        r = method.generate(img, mask, "hole", seed=3)
        if real_range:
            assert r.metadata["x0_real_range"] == {"lo": [LO] * 3, "hi": [HI] * 3, "q": 0.0}
        return r.image[inner].astype(int)

    bounded, free = run(True), run(False)
    assert bounded.min() >= LO - 1 and bounded.max() <= HI + 1
    # the untrained model paints far outside [LO, HI] without the bound: the test can fail
    assert (free < LO - 1).mean() + (free > HI + 1).mean() > 0.2

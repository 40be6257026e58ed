"""The model-free baselines against their papers: CutPaste (Li et al. 2021) and DRAEM's Perlin anomalies.

Each expected value is recomputed here from the paper's definition, never by calling
the line under test: DRAEM Eq. 1's blend, Perlin's quintic fade and lattice, the
CutPaste patch's area share and aspect ratio, the scar's size, and the rule that only
the returned mask's pixels change.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from defectforge.errors import ParamsError
from defectforge.methods import get_method_class, needs_checkpoints
from defectforge.methods.cutpaste import CutPaste
from defectforge.methods.perlin import Perlin, draem_blend, fade, perlin_2d, perlin_mask
from defectforge.methods.cutpaste import CutPasteConfig
from defectforge.methods.perlin import PerlinConfig

H, W = 96, 128


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([(xx * 2) % 256, (yy * 2) % 256, (xx + yy) % 256], -1).astype(np.uint8)  # every pixel distinct-ish
    image = np.clip(image.astype(int) + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((H, W), bool)
    mask[40:52, 50:80] = True
    defect_img = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
    return image, mask, defect_img


def test_registry_knows_both_and_neither_needs_checkpoints():
    assert get_method_class("cutpaste") is CutPaste and get_method_class("perlin") is Perlin
    assert not needs_checkpoints("cutpaste") and not needs_checkpoints("perlin")


# --- DRAEM -----------------------------------------------------------------------------

def test_draem_eq1_blend():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)
    source = rng.integers(0, 256, (8, 9, 3)).astype(np.uint8)
    m = rng.random((8, 9)) < 0.5
    beta = 0.3
    out = draem_blend(image, source, m, beta)
    i, a = image.astype(float), source.astype(float)
    inside = (1 - beta) * a + beta * i  # (1 - beta) (M_a A) + beta (M_a I) where M_a = 1
    assert np.array_equal(out[~m], image[~m])  # (1 - M_a) I where M_a = 0
    assert np.abs(out[m].astype(float) - inside[m]).max() <= 0.5 + 1e-9
    # beta = 0: the source replaces the masked pixels; beta = 1: nothing changes
    assert np.array_equal(draem_blend(image, source, m, 0.0)[m], source[m])
    assert np.array_equal(draem_blend(image, source, m, 1.0), image)


def test_perlin_fade_is_the_quintic():
    t = np.linspace(0, 1, 11)
    assert np.allclose(fade(t), 6 * t**5 - 15 * t**4 + 10 * t**3)
    assert fade(np.array(0.5)) == pytest.approx(0.5)


def test_perlin_noise_is_zero_on_the_lattice_smooth_and_has_the_requested_frequency():
    rng = np.random.default_rng(1)
    shape = (64, 64)
    for res in [(1, 1), (4, 2), (8, 8)]:
        n = perlin_2d(shape, res, np.random.default_rng(res[0] * 10 + res[1]))
        step = (shape[0] // res[0], shape[1] // res[1])
        assert np.abs(n[:: step[0], :: step[1]]).max() < 1e-9  # gradient noise vanishes at lattice points
        assert np.abs(n).max() <= math.sqrt(2) + 1e-6
        # smooth: neighbouring pixels differ by at most the gradient bound times the cell step
        assert np.abs(np.diff(n, axis=0)).max() <= 2.0 * res[0] / shape[0] * 2 + 1e-6
    low, high = perlin_2d(shape, (1, 1), rng), perlin_2d(shape, (16, 16), rng)
    crossings = lambda x: int((np.diff(np.sign(x), axis=1) != 0).sum())  # noqa: E731
    assert crossings(high) > 4 * crossings(low)


def test_perlin_mask_thresholds_the_noise():
    m_hi = perlin_mask((64, 80), np.random.default_rng(5), 6, 0.5)
    m_lo = perlin_mask((64, 80), np.random.default_rng(5), 6, -0.2)
    assert m_hi.shape == (64, 80) and m_hi.dtype == bool
    assert (m_hi & ~m_lo).sum() == 0 and m_lo.sum() > m_hi.sum()  # same noise, lower threshold: a superset


def test_perlin_generate_changes_only_its_mask_which_sits_in_the_grown_target_box(scene):
    image, mask, defect_img = scene
    method = Perlin(PerlinConfig(placement="target", spread=1.0))
    method.fit([(defect_img, mask)], "crack")
    for seed in range(8):
        r = method.generate(image, mask, "crack", seed)
        assert r.mask.any() and r.image.shape == image.shape and r.image.dtype == np.uint8
        changed = np.any(r.image != image, axis=-1)
        assert not (changed & ~r.mask).any()
        ys, xs = np.nonzero(r.mask)
        assert ys.min() >= 40 - 6 and ys.max() < 52 + 6 and xs.min() >= 50 - 15 and xs.max() < 80 + 15
        assert 0 <= r.metadata["beta"] <= 0.8
    a, b = method.generate(image, mask, "crack", 4), method.generate(image, mask, "crack", 4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_perlin_placement_anywhere_is_drae_ms_whole_image(scene):
    image, mask, defect_img = scene
    method = Perlin(PerlinConfig(source="self"))  # the default placement is DRAEM's
    method.fit([], "crack")
    outside = 0
    for seed in range(8):
        r = method.generate(image, mask, "crack", seed)
        outside += int((r.mask & ~np.pad(np.ones((36, 60), bool), ((28, H - 64), (35, W - 95)))).sum())
    assert outside > 0


def test_perlin_keeps_a_grey_part_grey(scene):
    image, mask, defect_img = scene  # the anomaly source is coloured noise
    grey = np.repeat(image[..., :1], 3, axis=-1)
    for keep, expect_grey in [(True, True), (False, False)]:
        method = Perlin(PerlinConfig(keep_gray=keep))
        method.fit([(defect_img, mask)], "crack")
        outs = [method.generate(grey, mask, "crack", s).image for s in range(4)]
        spread = max(int(np.abs(o.astype(int) - o[..., :1].astype(int)).max()) for o in outs)
        assert (spread <= 2) == expect_grey, spread


def test_perlin_without_fitted_defects_says_which_type(scene):
    image, mask, _ = scene
    with pytest.raises(Exception, match="'scratch'"):
        Perlin().generate(image, mask, "scratch", 0)


# --- CutPaste ----------------------------------------------------------------------------

def test_cutpaste_patch_area_share_and_aspect_follow_the_paper(scene):
    image, mask, _ = scene
    method = CutPaste(CutPasteConfig(variant="patch", jitter=0.0))
    areas, aspects = [], []
    for seed in range(40):
        r = method.generate(image, mask, "crack", seed)
        h, w = r.metadata["size"]
        areas.append(h * w / (H * W))
        aspects.append(w / h)
        # jitter 0: the pasted pixels are the image's own pixels from the cut place
        (sy, sx), (py, px) = r.metadata["cut_from"], r.metadata["pasted_at"]
        assert np.array_equal(r.image[py : py + h, px : px + w], image[sy : sy + h, sx : sx + w])
        assert r.mask.sum() == h * w and r.mask[py : py + h, px : px + w].all()
        assert not (np.any(r.image != image, axis=-1) & ~r.mask).any()
    # rounding h and w to whole pixels moves the share a little past the paper's bounds
    assert 0.015 <= min(areas) and max(areas) <= 0.16
    assert max(areas) - min(areas) > 0.06  # the draw spans the range, not one size
    assert 0.25 <= min(aspects) and max(aspects) <= 1 / 0.25
    assert min(aspects) < 0.8 and max(aspects) > 1.25  # both orientations


def test_cutpaste_scar_size_and_rotation(scene):
    image, mask, _ = scene
    method = CutPaste(CutPasteConfig(variant="scar", jitter=0.1))
    angles = []
    for seed in range(30):
        r = method.generate(image, mask, "crack", seed)
        h, w = r.metadata["size"]
        assert 2 <= w <= 16 and 10 <= h <= 25
        assert abs(r.metadata["angle"]) <= 45
        angles.append(r.metadata["angle"])
        assert abs(int(r.mask.sum()) - h * w) <= 0.35 * h * w + 4  # a rotated h x w bar
        assert not (np.any(r.image != image, axis=-1) & ~r.mask).any()
    assert min(angles) < -10 and max(angles) > 10


def test_cutpaste_is_centred_on_the_target_and_seeded(scene):
    image, mask, _ = scene
    method = CutPaste()
    r = method.generate(image, mask, "crack", 11)
    ys, xs = np.nonzero(r.mask)
    assert abs(ys.mean() - 45.5) <= 2 and abs(xs.mean() - 64.5) <= 2
    again = method.generate(image, mask, "crack", 11)
    assert np.array_equal(r.image, again.image)
    assert {method.generate(image, mask, "crack", s).metadata["variant"] for s in range(12)} == {"patch", "scar"}


def test_configs_refuse_bad_ranges():
    with pytest.raises(ParamsError, match="cutpaste.area_ratio"):
        CutPasteConfig(area_ratio=(0.2, 0.1))
    with pytest.raises(ParamsError, match="perlin.beta_max"):
        PerlinConfig(beta_max=1.5)

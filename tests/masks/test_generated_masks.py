"""AnomalyDiffusion's mask generation (Eq. 9): the loss, the sampler, both mask models, disk, and the generate stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.diffusion.models import build_tiny_components
from defectforge.errors import DataError
from defectforge.methods.anomalydiffusion.mask_model import (
    MASK_MODEL_DIR,
    MaskModel,
    _scheduler,
    load_mask_model,
    in_shape_range,
    masks_to_tensor,
    save_mask_model,
    shape_range,
    tensor_to_mask,
)
from defectforge.methods.anomalydiffusion.mask_training import eq9_loss, train_mask_model


class _Out:
    def __init__(self, sample):
        self.sample = sample


class _AffineUNet(torch.nn.Module):
    """eps_theta(z_t, t) = 0.3 z_t + t / 1000: known, so Eq. 9 can be recomputed by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, z, t):
        return _Out(self.w * z + t.view(-1, 1, 1, 1).float() / 1000)


class _OracleUNet(torch.nn.Module):
    """The exact clean image of a one-mask data set (the diffusion kind's output is x^_0)."""

    def __init__(self, x0):
        super().__init__()
        self.x0, self.p = x0, torch.nn.Parameter(torch.zeros(1))

    def forward(self, z, t):
        return _Out(self.x0.expand_as(z))


class _FakeBase:
    """A frozen base whose eps_theta(z_t, t, e) = 0.3 z_t + t / 1000 + mean(e): Eq. 9 by hand."""

    device = torch.device("cpu")

    def eps(self, z, t, context, kinds, region_mask):
        assert kinds is None and torch.equal(region_mask, torch.ones_like(region_mask))
        return 0.3 * z + t.view(-1, 1, 1, 1).float() / 1000 + context.mean(dim=(1, 2)).view(-1, 1, 1, 1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from defectforge.diffusion.models import save_tiny

    d = tmp_path_factory.mktemp("mm") / "base"
    save_tiny(build_tiny_components(seed=0), d)
    return d


def _square(n=32, top=2, left=3, h=10, w=12):
    m = np.zeros((n, n), bool)
    m[top : top + h, left : left + w] = True
    return m


def test_eq9_loss_by_hand():
    sched = _scheduler()
    g = torch.Generator().manual_seed(0)
    z0 = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(3, 1, 8, 8, generator=g)
    t = torch.tensor([10, 500, 990])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps  # DDIM Eq. 1
    e_m = torch.randn(4, 6, generator=g)
    ti = MaskModel("textual-inversion", 8, sched, comps=_FakeBase(), e_m=e_m)
    expected = ((eps - (0.3 * z_t + t.view(-1, 1, 1, 1) / 1000 + e_m.mean())) ** 2).mean()  # Eq. 9
    assert torch.allclose(eq9_loss(ti, z0, t, eps, sched.alphas_cumprod), expected, atol=1e-6)
    # the diffusion kind: the clean-image form, || z_0 - x^_0(z_t) ||^2, and its eps is Eq. 9's up to sqrt(a / (1 - a))
    model = MaskModel("diffusion", 8, sched, unet=_AffineUNet())
    x0_hat = 0.3 * z_t + t.view(-1, 1, 1, 1) / 1000
    assert torch.allclose(eq9_loss(model, z0, t, eps, sched.alphas_cumprod), ((z0 - x0_hat) ** 2).mean(), atol=1e-6)
    assert torch.allclose(eps - model.eps(z_t, t), (a / (1 - a)).sqrt() * (x0_hat - z0), atol=1e-4)


def test_sampler_with_the_exact_noise_returns_the_mask():
    sched = _scheduler()
    m = _square(64, 10, 30, 10, 20)
    x0 = masks_to_tensor([m], 32)
    model = MaskModel("diffusion", 32, sched, unet=_OracleUNet(x0))
    out = model.sample((64, 64), seed=0, steps=30)
    assert out is not None and (out == m).mean() > 0.995


def test_cover_and_area_downsampling_of_a_thin_crack():
    m = np.zeros((256, 256), bool)
    m[:, 100] = True  # one pixel wide: 1/4 of a 64-px cell
    m[40:43, 202:205] = True  # a 3 x 3 pit across columns 50 and 51 of the 64-px grid
    area = masks_to_tensor([m], 64, "area")
    assert area.shape == (1, 1, 64, 64)
    assert (area[0, 0, :, 25] > -1).all() and float(area[0, 0, 0, 25]) == pytest.approx(-0.5)  # share 1/4 -> -0.5
    # cover (the default): the crack is a line at full strength, the pit a defect pixel in every cell it touches
    cover = masks_to_tensor([m], 64)
    assert (cover[0, 0, :, 25] == 1).all()
    assert (cover[0, 0, 10, 50:52] == 1).all() and cover[0, 0, 10, 49] == -1 and cover[0, 0, 10, 52] == -1
    assert int((cover == 1).sum()) == 64 + 2
    for x in (area, cover):
        assert (x[0, 0, :, 40] == -1).all()
    # thresholded at the middle of the value range, the cover line survives a round trip; the area line does not
    assert tensor_to_mask(cover[0], (256, 256))[:, 100].all()
    assert not tensor_to_mask(area[0], (256, 256))[:, 90:110].any()
    assert tensor_to_mask(torch.ones(1, 4, 4), (10, 7)).shape == (10, 7)
    with pytest.raises(ValueError, match="downsample"):
        masks_to_tensor([m], 64, "nearest")


def _disc(n=64, cy=32, cx=32, r=8):
    yy, xx = np.mgrid[:n, :n]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_shape_range_by_hand_and_the_gate():
    from defectforge.metrics.mask_shapes import elongation

    lines = [np.zeros((64, 64), bool) for _ in range(3)]
    for i, m in enumerate(lines):
        m[10 : 40 + 5 * i, 20 + i] = True  # 30, 35, 40 px long, one wide
    rng = shape_range(lines)
    areas = [np.log10(m.mean()) for m in lines]
    els = [elongation(m) for m in lines]
    assert rng["log10_area"] == pytest.approx([min(areas) - 0.25, max(areas) + 0.25])
    assert rng["elongation"] == pytest.approx([min(els) - 0.10, min(1.0, max(els) + 0.10)])
    assert min(els) > 0.9 and elongation(_disc()) < 0.05
    assert in_shape_range(lines[0], rng)
    disc = _disc(r=4)  # about the lines' area, but round: a fat oval for a type of lines
    assert abs(np.log10(disc.mean()) - np.mean(areas)) < 0.25
    assert not in_shape_range(disc, rng)  # elongation outside
    long_line = np.zeros((64, 64), bool)
    long_line[:, 5:13] = True  # a line, 10x the area
    assert not in_shape_range(long_line, rng)  # area outside
    assert not in_shape_range(np.zeros((64, 64), bool), rng)
    assert in_shape_range(disc, None)  # a model saved without a range accepts any non-empty draw


def test_sample_redraws_outside_the_shape_range():
    """A model whose every draw is a disc: accepted for a type of discs, refused (None) for a type of lines."""
    sched = _scheduler()
    x0 = masks_to_tensor([_disc(64, 30, 34, 6)], 32)
    model = MaskModel("diffusion", 32, sched, unet=_OracleUNet(x0))
    lines = [np.zeros((64, 64), bool) for _ in range(2)]
    lines[0][5:50, 10] = True
    lines[1][8:60, 40:42] = True
    model.meta = {"shape_range": shape_range([_disc(64, 20, 20, 5), _disc(64, 40, 30, 7)])}
    out = model.sample((64, 64), seed=0, steps=10)
    assert out is not None and (out == _disc(64, 30, 34, 6)).mean() > 0.99
    model.meta = {"shape_range": shape_range(lines)}
    assert model.sample((64, 64), seed=0, steps=10, tries=3) is None
    assert model.sample((64, 64), seed=0, steps=10, gate=False) is not None


def test_diffusion_mask_model_learns_shape_and_place(tmp_path):
    """A set of masks that are all one square in the top-left: drawn masks sit there."""
    masks = [_square(32, 2 + d, 3 + d, 10, 12) for d in (0, 1, 0, 1)]
    model = train_mask_model(masks, kind="diffusion", resolution=16, steps=300, batch_size=8, flip=False, seed=0, lr=3e-3)
    assert model.meta["metrics"]["loss_last"] < model.meta["metrics"]["loss_first"]
    assert model.meta["downsample"] == "cover" and model.meta["shape_range"] == shape_range(masks)
    ref = _square(32, 2, 3, 11, 13)
    ious = []
    for s in range(4):
        out = model.sample((32, 32), seed=s, steps=20)
        assert out is not None
        ious.append((out & ref).sum() / (out | ref).sum())
    assert np.mean(ious) > 0.5, ious
    # and back from disk (safetensors), the same draws
    save_mask_model(model, tmp_path / MASK_MODEL_DIR)
    assert (tmp_path / MASK_MODEL_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    again = load_mask_model(tmp_path / MASK_MODEL_DIR)
    assert (again.sample((32, 32), seed=1, steps=20) == model.sample((32, 32), seed=1, steps=20)).all()


def test_textual_inversion_trains_only_e_m(tmp_path):
    comps = build_tiny_components(seed=0)
    base = tmp_path / "base"
    from defectforge.diffusion.models import save_tiny

    save_tiny(comps, base)
    from defectforge.diffusion.models import load_pipeline_components

    comps = load_pipeline_components(str(base), device="cpu")
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    masks = [_square(48, 5, 5, 12, 12), _square(48, 20, 30, 8, 10)]
    model = train_mask_model(masks, kind="textual-inversion", comps=comps, tokens=4, steps=3, batch_size=2, seed=0)
    assert model.e_m.shape == (4, comps.unet.config.cross_attention_dim)
    assert all(torch.equal(before[k], v) for k, v in comps.unet.state_dict().items())  # the base stays frozen
    # e_m reaches the UNet: another embedding gives another noise prediction
    z = torch.randn(model.latent_shape(1), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    other = MaskModel("textual-inversion", model.resolution, model.scheduler, comps=comps, e_m=model.e_m + 1.0)
    assert not torch.allclose(model.eps(z, t), other.eps(z, t))
    save_mask_model(model, tmp_path / "mm", base=str(base))
    again = load_mask_model(tmp_path / "mm")
    assert torch.equal(again.e_m, model.e_m)
    a, b = again.sample((48, 48), seed=3, steps=4, tries=1), model.sample((48, 48), seed=3, steps=4, tries=1)
    assert (a is None and b is None) or (a == b).all()


def test_refuses_missing_or_empty(tmp_path):
    with pytest.raises(DataError, match="no trained mask model"):
        load_mask_model(tmp_path / "nothing")
    with pytest.raises(DataError, match="training mask 1"):
        masks_to_tensor([_square(), np.zeros((32, 32), bool)], 16)
    with pytest.raises(ValueError, match="kind"):
        train_mask_model([_square()], kind="gan")


def test_finetune_stage_trains_a_mask_model_per_type(sample_manifests, tiny_base, tmp_path):
    import json

    from defectforge.params.finetune import FinetuneParams
    from defectforge.pipeline.finetune import run as run_finetune
    from defectforge.pipeline.pretrain import BASE_POINTER

    _, split = sample_manifests
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / BASE_POINTER).write_text(json.dumps({"profile": "tiny", "base": str(tiny_base)}))
    out = run_finetune(FinetuneParams(steps=1, batch_size=2, mask_model="diffusion", mask_model_steps=3, mask_model_resolution=16,
                                      mask_model_downsample="area", device="cpu"), split, pre, tmp_path / "ft", progress=False)
    index = json.loads((out / "checkpoints.json").read_text())
    assert index
    for key, entry in index.items():
        model = load_mask_model(out / entry["path"] / MASK_MODEL_DIR)
        assert model.kind == "diffusion" and model.resolution == 16 and entry["metrics"]["mask_model"]["steps"] == 3
        assert model.meta["downsample"] == "area" and set(model.meta["shape_range"]) == {"log10_area", "elongation"}
    without = run_finetune(FinetuneParams(steps=1, batch_size=2, device="cpu"), split, pre, tmp_path / "ft2", progress=False)
    assert not list(without.rglob("mask_model.json"))


def test_textual_inversion_on_the_pretrained_profile_offline(tmp_path):
    """Eq. 9 on a Stable-Diffusion-layout model: masks through the VAE, e_m in the UNet's context space."""
    from defectforge.diffusion.models import build_tiny_latent_model
    from defectforge.methods.anomalydiffusion.mask_training import fit_mask_model

    base = build_tiny_latent_model(tmp_path / "sd")
    metrics = fit_mask_model(base, [_square(64, 5, 5, 20, 20), _square(64, 30, 20, 10, 30)], tmp_path / "mm", kind="textual-inversion",
                             device="cpu", tokens=4, steps=2, batch_size=2)
    assert metrics["steps"] == 2
    model = load_mask_model(tmp_path / "mm")
    assert model.comps.profile == "pretrained" and model.latent_shape(1)[1] == model.comps.latent_channels
    z = model.sample((40, 50), seed=0, steps=2, tries=1)
    assert z is None or z.shape == (40, 50)

"""AnomalyDiffusion: spatial anomaly embedding, masked textual inversion (Eq. 5-6) on a
frozen base, blended sampling (Eq. 1) with adaptive attention re-weighting (Eq. 7-8).

The sampler test uses an oracle UNet whose prediction depends on z_t, t, the context e,
the mask and the re-weighting map it is handed, and recomputes the expected latent
with its own loop written from the equations (never by calling the code under test).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from defectforge.errors import DataError
from defectforge.methods.anomalydiffusion import (
    AnomalyDiffusion,
    SpatialEncoder,
    fit_anomaly_embedding,
    masked_diffusion_loss,
    sample_anomalydiffusion,
    spatial_anomaly_embedding,
    train_anomaly_embedding,
)
from defectforge.methods.anomalydiffusion.config import AnomalyDiffusionConfig

torch.set_num_threads(1)
R = 16


def _defect(seed=0, size=48):
    rng = np.random.default_rng(seed)
    img = rng.integers(80, 120, (size, size, 3), dtype=np.uint8)
    m = np.zeros((size, size), bool)
    m[20:28, 10:30] = True
    out = img.copy()
    out[m] = 20
    return img, out, m


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from defectforge.diffusion import build_tiny_components
    from defectforge.diffusion.models import save_tiny

    d = tmp_path_factory.mktemp("ad") / "base"
    save_tiny(build_tiny_components(seed=0), d)
    return d


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    _, defect, m = _defect()
    ft = tmp_path_factory.mktemp("ad_ft") / "crack"
    metrics = fit_anomaly_embedding(tiny_base, [(defect, m)], "crack", ft / "anomaly_embedding", device="cpu", steps=3, batch_size=2)
    return ft, metrics


def test_spatial_encoder_tokens_carry_the_mask_location():
    enc = SpatialEncoder(3, 8).eval()
    left, right = torch.zeros(1, 1, 32, 32), torch.zeros(1, 1, 32, 32)
    left[..., 10:20, 2:10] = 1
    right[..., 10:20, 22:30] = 1
    with torch.no_grad():
        a, b = enc(left), enc(right)
        e = spatial_anomaly_embedding(torch.ones(2, 8), enc, left)
    assert a.shape == (1, 3, 8) and (a - b).abs().max() > 1e-3
    assert e.shape == (1, 5, 8) and torch.equal(e[0, :2], torch.ones(2, 8)) and torch.equal(e[:, 2:], a)
    # the FPN written out: three stride-2 stages, 1x1 laterals, top-down sums, 4x4 pooling, one head per token
    with torch.no_grad():
        h, feats = left * 2 - 1, []
        for st in enc.stages:
            h = st(h)
            feats.append(h)
        l1, l2, l3 = (lat(f) for lat, f in zip(enc.laterals, feats))
        p3 = l3
        p2 = l2 + F.interpolate(p3, size=l2.shape[-2:], mode="nearest")
        p1 = l1 + F.interpolate(p2, size=l1.shape[-2:], mode="nearest")
        pooled = torch.cat([F.adaptive_avg_pool2d(p, 4).flatten(1) for p in (p1, p2, p3)], dim=1)
        want = torch.stack([head(pooled) for head in enc.heads], dim=1)
    torch.testing.assert_close(a, want)


def test_eq5_masked_loss_by_hand():
    eps = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    pred = torch.tensor([[[[0.0, 0.0], [100.0, 1.0]]]])
    m = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    # masked entries: (1-0)^2 + (2-0)^2 + (4-1)^2 = 14 over 3 entries; the outside pixel (3 vs 100) is invisible
    assert float(masked_diffusion_loss(eps, pred, m)) == pytest.approx(14 / 3)
    pred2 = pred.clone()
    pred2[0, 0, 1, 0] = -7.0
    assert float(masked_diffusion_loss(eps, pred2, m)) == pytest.approx(14 / 3)


def test_masked_textual_inversion_keeps_the_base_frozen_and_learns_e_a_and_E(tiny_base):
    from defectforge.diffusion.models import load_pipeline_components

    comps = load_pipeline_components(tiny_base, device="cpu")
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    prompts_before = {k: v.detach().clone() for k, v in comps.prompts.tokens.items()}
    _, defect, m = _defect()
    e_a, enc, metrics = train_anomaly_embedding(comps, [(defect, m)], steps=3, batch_size=2, seed=0)
    assert all(torch.equal(before[k], v) for k, v in comps.unet.state_dict().items())
    assert all(torch.equal(prompts_before[k], v.detach()) for k, v in comps.prompts.tokens.items())
    init = torch.randn(4, e_a.shape[1], generator=torch.Generator().manual_seed(0)) * 0.5
    assert e_a.shape == (4, comps.unet.config.cross_attention_dim) and (e_a - init).abs().max() > 1e-4
    fresh = SpatialEncoder(4, e_a.shape[1])
    assert metrics["steps"] == 3 and np.isfinite(metrics["loss_last"])
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), enc.state_dict().values()))


class OracleUNet(nn.Module):
    """eps = 0.5 sqrt(1 - a_t) tanh(z) + (0.3 + 0.7 w) v(e) + 0.2 m; w = the re-weighting map (1 without)."""

    def __init__(self, alphas, dim):
        super().__init__()
        self.alphas = alphas
        self.P = torch.randn(dim, 3, generator=torch.Generator().manual_seed(11))
        self.config = SimpleNamespace(out_channels=3, in_channels=3, sample_size=R, cross_attention_dim=dim)

    @staticmethod
    def v(P, ctx):
        u = ctx.mean(1)
        return torch.tanh(3 * (u / u.norm(dim=-1, keepdim=True)) @ P)[:, :, None, None]

    def forward(self, x, t, encoder_hidden_states=None, cross_attention_kwargs=None):
        kw = cross_attention_kwargs or {}
        rw = kw.get("reweight")
        w = rw.weights if rw is not None else torch.ones_like(kw["region_mask"])
        a = self.alphas[t.long()].view(-1, 1, 1, 1).to(x)
        eps = 0.5 * (1 - a).sqrt() * torch.tanh(x) + (0.3 + 0.7 * w) * self.v(self.P, encoder_hidden_states) + 0.2 * kw["region_mask"]
        return SimpleNamespace(sample=eps)


def _oracle_comps():
    from defectforge.diffusion import build_tiny_components

    comps = build_tiny_components(seed=0)
    comps.unet = OracleUNet(comps.scheduler.alphas_cumprod, 8)
    return comps


def _hand_dilate(m, r):
    """Square dilation by r pixels, written out with scipy (the code under test max-pools)."""
    from scipy.ndimage import binary_dilation

    if r <= 0:
        return m.clone()
    out = binary_dilation(m[0, 0].numpy() > 0, structure=np.ones((2 * r + 1, 2 * r + 1), bool))
    return torch.from_numpy(out.astype(np.float32))[None, None]


def _hand_r(t, width):
    return int((t + 100) * 8 * width / 32 // 1000)  # the authors' (t + 100) * 8 // 1000 on a 32-px latent


def _hand_w(zt, z0, m):
    """Eq. 7 as the authors' code computes it: d = mean_c (m (z_t - z_0))^2, linear normalisation of
    1/d times ||m||_1, clamped to [1, 1.5] inside m, 1 outside."""
    d = ((m * (zt - z0)) ** 2).mean(1).flatten()
    inside = (m.flatten() > 0) & (d > 0)
    inv = torch.zeros_like(d)
    inv[inside] = 1.0 / d[inside]
    w = torch.ones_like(d)
    w[inside] = (m.sum() * inv[inside] / inv.sum()).clamp(1.0, 1.5)
    return w.view(1, 1, *zt.shape[-2:])


@pytest.mark.parametrize("reweight", [True, False])
def test_sampler_follows_eq1_eq7_eq8_by_hand(reweight):
    comps = _oracle_comps()
    g = torch.Generator().manual_seed(5)
    y = torch.rand(1, 3, R, R, generator=g) * 2 - 1
    m = torch.zeros(1, 1, R, R)
    m[..., 6:9, 5:10] = 1
    e = torch.randn(1, 6, 8, generator=g)
    steps = 4
    log = []
    got = sample_anomalydiffusion(comps, y, m, e, steps, torch.Generator().manual_seed(9), reweight=reweight, log=log)

    # by hand
    comps.scheduler.set_timesteps(steps)
    ts = [int(t) for t in comps.scheduler.timesteps]
    ac = comps.scheduler.alphas_cumprod
    alphas = [float(ac[t]) for t in ts] + [float(comps.scheduler.final_alpha_cumprod)]
    gen = torch.Generator().manual_seed(9)
    v = OracleUNet.v(comps.unet.P, e)

    def eps_at(z, a, w):
        return 0.5 * (1 - torch.tensor(a)).sqrt() * torch.tanh(z) + (0.3 + 0.7 * w) * v + 0.2 * m

    noise = torch.randn(y.shape, generator=gen)
    z = alphas[0] ** 0.5 * y + (1 - alphas[0]) ** 0.5 * noise
    radii = []
    for i in range(steps):
        a, a_prev = alphas[i], alphas[i + 1]
        w = torch.ones_like(m)
        if reweight:
            m_t = _hand_dilate(m, _hand_r(ts[i], R))
            radii.append(_hand_r(ts[i], R))
            w = _hand_w(z, y, m_t)  # distance between the current sample and the normal latent
            torch.testing.assert_close(log[i][2], w, rtol=1e-5, atol=1e-6)
        eps = eps_at(z, a, w)
        x0 = (z - (1 - a) ** 0.5 * eps) / a**0.5
        z = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps  # DDIM, eta = 0
        bg = a_prev**0.5 * y + (1 - a_prev) ** 0.5 * torch.randn(y.shape, generator=gen)
        s = m
        if reweight:  # the blend region is the mask dilated for the next (cleaner) timestep
            s = torch.maximum(m, _hand_dilate(m, _hand_r(ts[i + 1] if i + 1 < steps else 0, R)))
        z = s * z + (1 - s) * bg  # Eq. 1
    torch.testing.assert_close(got, z, rtol=1e-4, atol=1e-5)
    assert len(log) == (steps if reweight else 0)
    if reweight:
        assert radii[0] > radii[-1] >= 0 and radii[0] >= 3  # the dilation shrinks with t
        for _, _, w in log:  # weights in [1, 1.5]; at least one pixel amplified in every step
            assert float(w.min()) >= 1.0 and float(w.max()) <= 1.5 + 1e-6 and float(w.max()) > 1.0


def test_reweighting_reaches_the_real_attention_processors():
    """With the tiny UNet (real MaskedCrossAttnProcessor), the sampler's re-weighted steps equal a
    hand loop that hands the hand-computed w_m to comps.eps, and w_m changes eps (so it is used)."""
    from defectforge.diffusion import build_tiny_components
    from defectforge.methods.anomalydiffusion.attention import AttentionReweight

    from defectforge.methods.anomalydiffusion.attention import install_reweighting

    comps = build_tiny_components(seed=0)
    install_reweighting(comps.unet)
    r = comps.resolution
    g = torch.Generator().manual_seed(1)
    y = torch.rand(1, 3, r, r, generator=g) * 2 - 1
    m = torch.zeros(1, 1, r, r)
    m[..., 20:30, 12:40] = 1
    e = torch.randn(1, 6, comps.unet.config.cross_attention_dim, generator=g)
    steps = 2
    got = sample_anomalydiffusion(comps, y, m, e, steps, torch.Generator().manual_seed(4), reweight=True)
    comps.scheduler.set_timesteps(steps)
    ts = [int(t) for t in comps.scheduler.timesteps]
    ac = comps.scheduler.alphas_cumprod
    alphas = [float(ac[t]) for t in ts] + [float(comps.scheduler.final_alpha_cumprod)]
    gen = torch.Generator().manual_seed(4)
    z = alphas[0] ** 0.5 * y + (1 - alphas[0]) ** 0.5 * torch.randn(y.shape, generator=gen)
    changed = []
    with torch.no_grad():
        for i in range(steps):
            a, a_prev = alphas[i], alphas[i + 1]
            w = _hand_w(z, y, _hand_dilate(m, _hand_r(ts[i], r)))
            eps = comps.eps(z, ts[i], e, None, m, cond_image=y, reweight=AttentionReweight(w))
            plain = comps.eps(z, ts[i], e, None, m, cond_image=y)
            changed.append(float((eps - plain).abs().max()))
            x0 = ((z - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-100, 100)
            z = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
            bg = a_prev**0.5 * y + (1 - a_prev) ** 0.5 * torch.randn(y.shape, generator=gen)
            s = torch.maximum(m, _hand_dilate(m, _hand_r(ts[i + 1] if i + 1 < steps else 0, r)))
            z = s * z + (1 - s) * bg
    torch.testing.assert_close(got, z, rtol=1e-4, atol=1e-4)
    assert min(changed) > 1e-5  # the processors use w_m


def test_masked_textual_inversion_learns_only_from_inside_the_mask():
    """Eq. 5 is masked: an oracle UNet whose prediction depends on e only outside the mask gives
    e_a no gradient (it stays at its initial value); one that depends on e inside moves it."""
    from defectforge.diffusion import build_tiny_components

    class Where(nn.Module):
        def __init__(self, inside):
            super().__init__()
            self.inside = inside
            self.config = SimpleNamespace(out_channels=3, in_channels=3, sample_size=64, cross_attention_dim=8)

        def forward(self, x, t, encoder_hidden_states=None, cross_attention_kwargs=None):
            m = cross_attention_kwargs["region_mask"]
            sel = m if self.inside else 1 - m
            u = encoder_hidden_states.mean(1)[:, :3, None, None]
            return SimpleNamespace(sample=x[:, :3] * 0.1 + sel * u)

    _, defect, m = _defect()
    init = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    moved = {}
    for inside in (False, True):
        comps = build_tiny_components(seed=0)
        comps.unet = Where(inside)
        e_a, _, _ = train_anomaly_embedding(comps, [(defect, m)], steps=3, batch_size=2, seed=0)
        moved[inside] = float((e_a - init).abs().max())
    assert moved[False] == 0.0 and moved[True] > 1e-4


def test_refuses_to_run_without_a_trained_embedding(tiny_base, tmp_path):
    image, _, m = _defect()
    (tmp_path / "crack").mkdir()
    meth = AnomalyDiffusion.from_pretrained(tmp_path / "crack", AnomalyDiffusionConfig(steps=2, device="cpu"))
    with pytest.raises(DataError, match=r"anomaly_embedding: no trained anomaly embedding .* finetune.anomaly_embedding: true"):
        meth.generate(image, m, "crack", 0)


def test_generate_keeps_the_background_and_is_reproducible(trained):
    ft, metrics = trained
    image, _, m = _defect(1)
    cfg = AnomalyDiffusionConfig(steps=3, device="cpu", feather=0)
    meth = AnomalyDiffusion.from_pretrained(ft, cfg)
    r1 = meth.generate(image, m, "crack", 7)
    r2 = meth.generate(image, m, "crack", 7)
    assert np.array_equal(r1.image, r2.image) and r1.image.shape == image.shape
    assert np.array_equal(r1.image[~m], image[~m]) and (r1.image[m] != image[m]).any()
    assert r1.metadata["reweight"] is True and r1.metadata["anomaly_embedding"]["tokens"] == 8
    off = AnomalyDiffusion.from_pretrained(ft, AnomalyDiffusionConfig(steps=3, device="cpu", feather=0, reweight=False))
    assert not np.array_equal(off.generate(image, m, "crack", 7).image, r1.image)  # Eq. 7-8 change the sample
    meta = json.loads((ft / "anomaly_embedding" / "anomaly_embedding.json").read_text())
    assert meta["trained"] and meta["defect_type"] == "crack" and meta["metrics"]["steps"] == 3
    assert len(meth.checkpoint_for("crack")) == 64
    with pytest.raises(DataError, match="anomaly embedding of 'crack', asked for 'dent'"):
        AnomalyDiffusion.from_pretrained({"dent": ft}, cfg).generate(image, m, "dent", 0)


def test_finetune_stage_option_writes_the_embedding(sample_manifests, tiny_base, tmp_path):
    from defectforge.params.finetune import FinetuneParams
    from defectforge.pipeline.finetune import run as run_finetune
    from defectforge.pipeline.pretrain import BASE_POINTER

    _, split = sample_manifests
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / BASE_POINTER).write_text(json.dumps({"profile": "tiny", "base": str(tiny_base)}))
    out = run_finetune(FinetuneParams(steps=1, batch_size=2, anomaly_embedding=True, anomaly_steps=2, device="cpu"), split, pre,
                       tmp_path / "ft", progress=False)
    index = json.loads((out / "checkpoints.json").read_text())
    assert index
    for key, entry in index.items():
        meta = json.loads((out / entry["path"] / "anomaly_embedding" / "anomaly_embedding.json").read_text())
        assert meta["defect_type"] == key.split("/")[1] and meta["metrics"]["steps"] == 2
        assert entry["metrics"]["anomaly_embedding"]["steps"] == 2
    # the generate stage's path: for_stage(finetune folder) + prepare(category, defect) + generate
    category, defect = sorted(index)[0].split("/")
    meth = AnomalyDiffusion.for_stage(AnomalyDiffusionConfig(steps=2, device="cpu", feather=0), out)
    meth.prepare(category, defect, [])
    image, _, m = _defect(2)
    r = meth.generate(image, m, defect, 0)
    assert np.array_equal(r.image[~m], image[~m]) and len(meth.checkpoint_for(defect)) == 64
    without = run_finetune(FinetuneParams(steps=1, batch_size=2, device="cpu"), split, pre, tmp_path / "ft2", progress=False)
    assert not list(without.rglob("anomaly_embedding.json"))
    meth = AnomalyDiffusion.for_stage(AnomalyDiffusionConfig(steps=2, device="cpu"), without)
    meth.prepare(category, defect, [])
    with pytest.raises(DataError, match="no trained anomaly embedding"):
        meth.generate(image, m, defect, 0)


def test_pretrained_profile_path_offline_with_a_tiny_latent_model(tmp_path):
    """Same code path on a Stable-Diffusion-layout model (VAE decoder for x^_0 in Eq. 7, latent masks)."""
    from defectforge.diffusion.models import build_tiny_latent_model

    base = build_tiny_latent_model(tmp_path / "sd")
    rng = np.random.default_rng(0)
    image = rng.integers(80, 120, (64, 64, 3), dtype=np.uint8)
    m = np.zeros((64, 64), bool)
    m[20:30, 10:40] = True
    defect = image.copy()
    defect[m] = 20
    metrics = fit_anomaly_embedding(base, [(defect, m)], "crack", tmp_path / "ft" / "anomaly_embedding", device="cpu", steps=2, batch_size=2)
    assert metrics["steps"] == 2
    meth = AnomalyDiffusion.from_pretrained(tmp_path / "ft", AnomalyDiffusionConfig(steps=2, device="cpu", feather=0))
    r = meth.generate(image, m, "crack", 3)
    assert r.metadata["profile"] == "pretrained" and r.metadata["resolution"] == 16
    assert np.array_equal(r.image[~m], image[~m]) and (r.image[m] != image[m]).any()

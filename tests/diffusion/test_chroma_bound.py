"""x0^'s chroma bounded to the source crop's gamut (colour products; the grey case is gray_steps)."""

import torch

from defectforge.diffusion.ddim import bound_eps, chroma_range, predict_x0


def _z_from_x0(x0: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    return a**0.5 * x0 + (1 - a) ** 0.5 * eps


def test_chroma_range_is_the_per_channel_quantile_of_x_minus_its_grey():
    x = torch.zeros(1, 3, 4, 4)
    x[0, 0] = 0.3  # red shifted: chroma R = +0.2, G = B = -0.1 everywhere
    lo, hi = chroma_range(x, q=0.0)
    assert torch.allclose(lo.flatten(), torch.tensor([0.2, -0.1, -0.1]), atol=1e-6)
    assert torch.allclose(hi.flatten(), torch.tensor([0.2, -0.1, -0.1]), atol=1e-6)


def test_bound_eps_keeps_the_grey_level_and_clips_foreign_colour():
    a = 0.5
    grey = torch.full((1, 3, 2, 2), 0.1)
    x0 = grey.clone()
    x0[0, 1, 0, 0] += 0.9  # a green confetti pixel (chroma far outside a grey source's gamut)
    eps = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    z = _z_from_x0(x0, eps, a)
    gamut = (torch.full((1, 3, 1, 1), -0.05), torch.full((1, 3, 1, 1), 0.05))
    out = predict_x0(z, bound_eps(z, eps, a, bound=1.0, chroma=gamut), a)
    g_in, g_out = x0.mean(1), out.mean(1)
    assert torch.allclose(g_in, g_out, atol=1e-5)  # brightness (the defect) is kept
    c = out - out.mean(1, keepdim=True)
    assert c.abs().max() <= 2 * 0.05 + 1e-5  # colour bounded to the gamut (up to the re-centring), was 0.6
    assert torch.allclose(out[..., 1:, :], x0[..., 1:, :], atol=1e-5)  # in-gamut pixels untouched


def test_no_chroma_means_no_change():
    a = 0.3
    eps = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    z = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(2)) * 0.1
    assert torch.equal(bound_eps(z, eps, a, bound=0.0, chroma=None), eps)

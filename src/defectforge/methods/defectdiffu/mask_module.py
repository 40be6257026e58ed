"""DefectDiffu's mask generation module and its loss (Sec. 3.4, Eq. 6 and the lambda term of Eq. 11).

Seed paper: ../shared/seeds/defectdiffu-consistency-modeling.txt. Notation:

    A_l           per-token cross-attention maps of layer l, (L_in, h_l, w_l): the defect
                  part's softmax over c_d under TDIA, or the inside tokens' columns of the
                  joint softmax without it (:class:`~defectforge.diffusion.attention.TokenMapStore`)
    M_f           mask features, at the latent's size and channels
    Mask_f        the real mask "encoded to feature": E(2 m - 1), the mask as a grey image
                  through the image encoder (the identity on the tiny profile)
    M_pre         pixel mask in [0, 1] (the paper's [0, 255] / 255): D(M_f), channel mean, to [0, 1]

    M_f = G([A_1, ..., A_n])                (maps resized to the latent grid, concatenated on channels)
    loss_m = || M_f - Mask_f ||_2^2         (6)   (mean over elements here: lambda absorbs the scale)
    loss = Eq. 5 (+ loss_d) + lambda loss_m (11)  (finetune.mask_module = lambda)

At sampling, M_pre^t is computed at each of the last steps and averaged,
M_pre = mean_t M_pre^t (the paper: the last 100 of 1000 steps), then binarised by the
iterative threshold (:func:`defectforge.methods.defectdiffu.iterative_threshold`).

G is a small convolution stack; the paper does not describe its layers. Saved as
safetensors with a json config (``save_pretrained`` / ``from_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from defectforge.errors import DefectforgeError

MASK_MODULE_DIR = "mask_module"
_CONFIG = "config.json"
_WEIGHTS = "mask_module.safetensors"


class MaskGenerationModule(nn.Module):
    """G of Eq. 6: concatenated per-token attention maps -> mask features M_f."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 32, layers: list[str] | None = None):
        super().__init__()
        self.config = {"in_channels": int(in_channels), "out_channels": int(out_channels), "hidden": int(hidden),
                       "layers": list(layers or [])}
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
            nn.Conv2d(hidden, out_channels, 3, padding=1),
        )

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        return self.net(maps)

    # ---- persistence ----
    def save_pretrained(self, folder: str | Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / _WEIGHTS))
        (folder / _CONFIG).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str | torch.device = "cpu") -> "MaskGenerationModule":
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / _CONFIG).is_file() or not (folder / _WEIGHTS).is_file():
            raise DefectforgeError(f"{folder}: not a saved mask generation module ({_CONFIG} + {_WEIGHTS})")
        cfg = json.loads((folder / _CONFIG).read_text())
        module = cls(cfg["in_channels"], cfg["out_channels"], cfg.get("hidden", 32), cfg.get("layers"))
        module.load_state_dict(load_file(str(folder / _WEIGHTS)))
        return module.to(device).eval().requires_grad_(False)


def module_input(step_maps: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """[A_1, ..., A_n]: one step's per-layer maps (R, L_in, h, w), in layer order, resized
    (bilinear) to the latent grid ``size`` and concatenated on channels: (R, n * L_in, H, W)."""
    if not step_maps:
        raise RuntimeError("no per-token cross-attention maps were captured for the mask module")
    ups = [F.interpolate(a.float(), size=size, mode="bilinear", align_corners=False) for a in step_maps.values()]
    return torch.cat(ups, dim=1)


def mask_features(comps, mask: torch.Tensor) -> torch.Tensor:
    """Mask_f: the real mask (B, 1, H, W) in {0, 1} encoded to the latent space, E(2 m - 1)."""
    x = (mask.float() * 2 - 1).expand(-1, 3, -1, -1).to(comps.device)
    return comps.encode(x)


def mask_loss(m_f: torch.Tensor, mask_f: torch.Tensor) -> torch.Tensor:
    """loss_m = ||M_f - Mask_f||_2^2, Eq. (6), as a mean over elements."""
    return ((m_f - mask_f.to(m_f.dtype)) ** 2).mean()


def decode_mask(comps, m_f: torch.Tensor) -> torch.Tensor:
    """M_pre: mask features -> pixel mask in [0, 1], (B, H, W) (the image decoder, channel mean)."""
    x = comps.decode(m_f)
    return ((x.mean(dim=1) + 1) / 2).clamp(0, 1)


def predicted_mask(comps, module: MaskGenerationModule, steps: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """M_pre = mean over the captured steps of M_pre^t = D(G(A^t)): (R, H, W) in [0, 1]."""
    if not steps:
        raise RuntimeError("no sampling step captured the attention maps the mask module reads")
    size = tuple(comps.latent_mask(torch.zeros(1, 1, comps.resolution, comps.resolution)).shape[-2:])
    dev = next(module.parameters()).device
    with torch.no_grad():
        per_step = [decode_mask(comps, module(module_input(s, size).to(dev))) for s in steps]
    return torch.stack(per_step).mean(0)

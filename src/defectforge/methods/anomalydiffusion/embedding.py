"""The spatial anomaly embedding e = {e_a, E(m)}: the spatial encoder E and the files of a
trained embedding (its masked textual inversion, Eq. 5-6, is :mod:`.training`).

    E, e_s = E(m)   spatial encoder and spatial embedding: n tokens from the mask (location)
    e_a             anomaly embedding: k learned tokens per anomaly type (appearance)

    L_dif = || m * (eps - eps_theta(z_t, t, {e_a, e_s})) ||_2^2                            (5)
    e_a*, E* = argmin_{e_a, E} E_{z ~ Enc(x_i), m_i, eps, t} L_dif                          (6)

The base model stays frozen; only e_a and E learn. Saved as safetensors beside a json
(``anomaly_embedding/`` in a finetune folder).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from defectforge.diffusion.models import base_reference, resolve_base_reference
from defectforge.errors import DataError

EMBEDDING_DIR = "anomaly_embedding"  # inside a finetune checkpoint folder
EMBEDDING_WEIGHTS = "anomaly_embedding.safetensors"
EMBEDDING_META = "anomaly_embedding.json"
FORMAT = "defectforge-anomalydiffusion/1"


# ------------------------------------------------------------------ spatial anomaly embedding


class SpatialEncoder(nn.Module):
    """E: mask (B, 1, R, R) in {0, 1} -> spatial embedding e_s (B, n, D).

    Three stride-2 conv stages; 1x1 laterals fused top-down (p3 = l3, p2 = l2 + up(p3),
    p1 = l1 + up(p2)); each level pooled to ``grid`` x ``grid`` (location survives) and
    flattened; n linear heads, one token each.
    """

    def __init__(self, n_tokens: int, dim: int, width: int = 16, grid: int = 4):
        super().__init__()
        self.n_tokens, self.dim, self.width, self.grid = n_tokens, dim, width, grid
        chans = [width, 2 * width, 4 * width]
        self.stages = nn.ModuleList()
        c_in = 1
        for c in chans:
            self.stages.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.SiLU()))
            c_in = c
        self.laterals = nn.ModuleList([nn.Conv2d(c, width, 1) for c in chans])
        self.heads = nn.ModuleList([nn.Linear(3 * width * grid * grid, dim) for _ in range(n_tokens)])

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        feats, h = [], m.float() * 2 - 1
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        lat = [lateral(f) for lateral, f in zip(self.laterals, feats)]
        fused = [lat[2]]
        for level in (1, 0):  # top-down, FPN-style
            fused.insert(0, lat[level] + F.interpolate(fused[0], size=lat[level].shape[-2:], mode="nearest"))
        pooled = torch.cat([F.adaptive_avg_pool2d(p, self.grid).flatten(1) for p in fused], dim=1)
        return torch.stack([head(pooled) for head in self.heads], dim=1)  # (B, n, D)

    def config(self) -> dict:
        return {"n_tokens": self.n_tokens, "dim": self.dim, "width": self.width, "grid": self.grid}


def spatial_anomaly_embedding(e_a: torch.Tensor, encoder: SpatialEncoder, m: torch.Tensor) -> torch.Tensor:
    """e = {e_a, e_s}: the k anomaly tokens followed by the n tokens E(m); (B, k + n, D)."""
    e_s = encoder(m)
    return torch.cat([e_a[None].expand(e_s.shape[0], -1, -1).to(e_s.dtype), e_s], dim=1)


def save_anomaly_embedding(folder: str | Path, e_a: torch.Tensor, encoder: SpatialEncoder, *, base: str, defect_type: str, metrics: dict) -> Path:
    """Write ``anomaly_embedding.safetensors`` (e_a, E) and ``anomaly_embedding.json`` (base, shapes, metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"e_a": e_a.detach().cpu().contiguous(), **{f"encoder.{k}": v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}}
    save_file(tensors, str(folder / EMBEDDING_WEIGHTS))
    meta = {"format": FORMAT, "base": base_reference(base, folder), "defect_type": defect_type, "encoder": encoder.config(), "trained": True, "metrics": metrics}
    (folder / EMBEDDING_META).write_text(json.dumps(meta, indent=2))
    return folder


def load_anomaly_embedding(folder: str | Path, device) -> tuple[torch.Tensor, SpatialEncoder, dict, Path]:
    """(e_a, E, meta, base path or id) from a folder written by :func:`save_anomaly_embedding`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights = folder / EMBEDDING_META, folder / EMBEDDING_WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise DataError(f"{folder}: no trained anomaly embedding ({EMBEDDING_META} + {EMBEDDING_WEIGHTS}); "
                        "run finetune with finetune.anomaly_embedding: true")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or not meta.get("trained"):
        raise DataError(f"{meta_path}: not a trained anomaly embedding of format {FORMAT}")
    state = load_file(str(weights))
    encoder = SpatialEncoder(**meta["encoder"])
    encoder.load_state_dict({k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")})
    return state["e_a"].to(device), encoder.to(device).eval().requires_grad_(False), meta, resolve_base_reference(meta["base"], folder)

"""A small U-Net (Ronneberger et al. 2015) for defect segmentation.

The seed papers measure the usefulness of synthetic data with a plain U-Net trained on
real + synthetic image-mask pairs (AnomalyDiffusion Sec. 4, ddim-inversion Sec. 4.3,
DefectDiffu Sec. 4.3). No pretrained encoder can be downloaded here, so this is the
original encoder-decoder shape at a small width: ``depth`` stages of two 3x3
conv-GroupNorm-ReLU layers, max-pool down, bilinear up + skip concatenation, and a 1x1
head giving one defect logit per pixel.

``norm="group"`` (GroupNorm) normalises each image over its own extent: training and
evaluation agree when both see whole images of one size (the built-in sample), but not
when training sees patches and evaluation whole images, whose statistics differ.
``norm="batch"`` (BatchNorm) is a fixed per-channel affine at evaluation (running
statistics), the same for a patch and a whole image: on Magnetic Tile (64 px patches,
whole-image evaluation) it raised real-only image AUROC from 0.60 to 0.73-0.76 at the
same budget (experiments/magnetic-tile-detector/magnetic-tile-detector-spread.md, "Making it learn").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


NORMS = ("group", "batch")


def _norm(kind: str, c: int) -> nn.Module:
    return nn.GroupNorm(max(1, min(8, c // 4)), c) if kind == "group" else nn.BatchNorm2d(c)


def _block(cin: int, cout: int, norm: str = "group") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        _norm(norm, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        _norm(norm, cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """(N, 3, H, W) float image in [-1, 1] -> (N, 1, H, W) defect logits.

    H and W must be divisible by ``2 ** (depth - 1)``.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, depth: int = 4, norm: str = "group"):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.config = {"in_channels": in_channels, "base_channels": base_channels, "depth": depth, "norm": norm}
        chans = [base_channels * 2**i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_block(cin, c, norm))
            cin = c
        self.up = nn.ModuleList()
        for c_skip in reversed(chans[:-1]):
            self.up.append(_block(cin + c_skip, c_skip, norm))
            cin = c_skip
        self.head = nn.Conv2d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = blk(x)
            skips.append(x)
        skips.pop()
        for blk in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip], dim=1))
        return self.head(x)

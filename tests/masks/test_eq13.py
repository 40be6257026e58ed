"""Eq. 13 end to end on constructed attention maps: per-layer maps -> mean over layers and
steps -> bilinear Resize -> m' * A_def -> threshold 1/2 inside the target mask."""

from __future__ import annotations

import numpy as np
import torch

from defectforge.diffusion.attention import AttentionStore
from defectforge.masks.refine import refine_mask


def test_eq13_on_constructed_maps_by_hand():
    # layer 1 (16x16): the defect tokens win (0.6) in columns 0..8, nothing elsewhere;
    # layer 2 (8x8): 0.8 everywhere. Mean: (A1_up + 0.8) / 2 >= 1/2  <=>  A1_up >= 0.2.
    # Bilinear 16 -> 64 (align_corners=False): source column s = (x + 0.5) / 4 - 0.5, and
    # between source columns 8 and 9 A1_up = 0.6 (1 - (s - 8)) >= 0.2  <=>  s <= 8 + 2/3
    # <=>  x <= 36.17: columns 0..36 are kept. (Nearest resize would keep 0..35, layer 1
    # alone 0..34, layer 2 alone everything.)
    a1 = torch.zeros(1, 16, 16)
    a1[..., :9] = 0.6
    a2 = torch.full((1, 8, 8), 0.8)
    store = AttentionStore()
    for _ in range(3):  # three sampling steps, same maps
        store.add("down.attn2", a1, a1)
        store.add("up.attn2", a2, a2)
    mean = store.mean_map((64, 64))[0]
    target = np.zeros((64, 64), bool)
    target[10:50, 20:60] = True
    att = (mean * torch.from_numpy(target).float()).numpy()  # m' * A_def (the method's output)
    refined = refine_mask(att, target, radius=0)  # Eq. 13
    expected = target.copy()
    expected[:, 37:] = False
    np.testing.assert_array_equal(refined, expected)
    # the threshold is Eq. 13's 1/2: at 0.65 only the columns where A1_up >= 0.5 remain
    # (0.6 (1 - f) >= 0.5 <=> s <= 8 + 1/6 <=> x <= 34.2)
    expected2 = target.copy()
    expected2[:, 35:] = False
    np.testing.assert_array_equal(refine_mask(att, target, threshold=0.65, radius=0), expected2)

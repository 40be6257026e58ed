"""IC-LPIPS as AnomalyDiffusion defines it: cluster centres = the real TRAINING images.

A fake deterministic LPIPS net (per-channel mean colour, unit-normalised, squared
difference summed over channels) makes every distance computable by hand in numpy.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import defectforge.metrics.fidelity as fidelity
from defectforge.metrics.fidelity import compute_fidelity

SIZE = 16


class _FakeLPIPS(nn.Module):
    """LPIPS-shaped net: one 'layer' = per-channel mean of (x + 2); lin = sum over channels."""

    def __init__(self):
        super().__init__()
        self.scaling_layer = nn.Identity()
        lin = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.ones_(lin.weight)
        self.lins = nn.ModuleList([lin])

    def net(self, x):
        return [x.mean(dim=(2, 3), keepdim=True) + 2.0]


def _flat(rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (SIZE, SIZE, 3)).copy()


def _hand_lpips(a, b):
    """The fake net's LPIPS by hand: unit vectors of (colour/127.5 - 1 + 2), squared distance."""
    u = [np.array(c, float) / 127.5 + 1.0 for c in (a, b)]
    u = [v / np.linalg.norm(v) for v in u]
    return float(((u[0] - u[1]) ** 2).sum())


def _hand_ic_lpips(fakes, centres):
    assign = [int(np.argmin([_hand_lpips(f, c) for c in centres])) for f in fakes]
    means = []
    for c in sorted(set(assign)):
        members = [f for f, a in zip(fakes, assign) if a == c]
        if len(members) >= 2:
            means.append(np.mean([_hand_lpips(x, y) for x, y in itertools.combinations(members, 2)]))
    return float(np.mean(means)), len(means)


TRAIN = [(200, 40, 40), (40, 40, 200)]            # two training defects: red-ish and blue-ish
HELD_OUT = [(40, 200, 40), (60, 180, 60)]          # held-out defects: both green-ish
FAKES = [(210, 50, 40), (180, 40, 70), (40, 60, 210), (70, 40, 180), (120, 60, 120)]


@pytest.fixture
def fake_net(monkeypatch):
    net = _FakeLPIPS().eval()
    monkeypatch.setattr(fidelity, "cached_lpips_backbone", lambda name, weights: (net, "fake-mean-colour"))
    return net


def test_ic_lpips_uses_training_centres_by_hand(fake_net):
    want, n_want = _hand_ic_lpips(FAKES, TRAIN)
    wrong, _ = _hand_ic_lpips(FAKES, HELD_OUT)
    assert n_want == 2 and abs(want - wrong) > 0.01  # the case separates the two protocols
    q = compute_fidelity([_flat(c) for c in HELD_OUT], [_flat(c) for c in FAKES], size=SIZE,
                        centres=[_flat(c) for c in TRAIN], centres_name="train")
    assert q["ic_lpips"] == pytest.approx(want, rel=1e-4)
    assert q["ic_lpips_clusters"] == n_want
    assert q["ic_lpips_centres"] == "train" and q["ic_lpips_n_centres"] == 2
    # LPIPS (fake -> nearest real) still measures against the held-out reals
    lp = np.mean([min(_hand_lpips(f, r) for r in HELD_OUT) for f in FAKES])
    assert q["lpips"] == pytest.approx(lp, rel=1e-4)


def test_without_centres_the_real_set_is_named(fake_net):
    q = compute_fidelity([_flat(c) for c in HELD_OUT], [_flat(c) for c in FAKES], size=SIZE)
    want, _ = _hand_ic_lpips(FAKES, HELD_OUT)
    assert q["ic_lpips"] == pytest.approx(want, rel=1e-4) and q["ic_lpips_centres"] == "real"


def test_empty_centres_skip_with_reason(fake_net):
    q = compute_fidelity([_flat(c) for c in HELD_OUT], [_flat(c) for c in FAKES], size=SIZE, centres=[])
    assert q["ic_lpips"] is None and "got 0 centres" in q["ic_lpips_skipped"]


def test_quality_stage_takes_centres_from_the_training_defects(sample_manifests, tmp_path, monkeypatch):
    """The stage passes the split's train-row defects of the type as centres (and names them)."""
    from defectforge.params.generate import GenerateParams
    from defectforge.params.quality import QualityParams
    from defectforge.params.refine import RefineParams
    from defectforge.manifest.io import read_manifest
    from defectforge.pipeline.generate import run as run_generate
    from defectforge.pipeline.quality import run as run_quality
    from defectforge.pipeline.refine import run as run_refine

    _, split = sample_manifests
    seen = []
    real_cq = fidelity.compute_fidelity

    def spy(real, fake, **kw):
        seen.append((len(real), None if kw.get("centres") is None else len(kw["centres"])))
        return real_cq(real, fake, **kw)

    monkeypatch.setattr(fidelity, "compute_fidelity", spy)
    gen = run_generate(GenerateParams(n_per_defect=2, shard_size=4), split, tmp_path / "gen", progress=False)
    refined = run_refine(RefineParams(), split, gen, tmp_path / "refined")
    metrics = run_quality(QualityParams(size=32), split, refined, tmp_path / "q", progress=False)
    df = read_manifest(split).to_pandas()
    for key, e in metrics["sets"].items():
        category, defect, _ = key.split("/")
        rows = df[(df.category == category) & (df.defect_type == defect)]
        n_train = int(((rows.split == "train") & (rows.defect_type != "good")).sum())
        assert n_train >= 1
        assert e["ic_lpips_centres"] == "train" and e["ic_lpips_n_centres"] == n_train
    assert seen and all(c is not None for _, c in seen)

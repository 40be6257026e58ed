"""Backbone loading: the standard paths with weights files of the right shape, and wrong ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from defectforge.errors import DefectforgeError
from defectforge.metrics.backbones import (
    random_inception_state_dict,
    resolve_feature_backbone,
    resolve_lpips_backbone,
)
from defectforge.metrics.fidelity import compute_fidelity


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("w") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=3), p)
    return p


def test_inception_weights_file_is_loaded(inception_file):
    feat, logits, name = resolve_feature_backbone("inception-v3", inception_file)
    assert name == "inception-v3"
    sd = torch.load(inception_file, weights_only=True)
    assert torch.equal(feat.extractor.state_dict()["fc.weight"], sd["fc.weight"])
    x = torch.randint(0, 256, (2, 3, 40, 40), dtype=torch.uint8)
    assert feat(x).shape == (2, 2048) and logits(x).shape == (2, 1008)


def test_inception_from_safetensors(tmp_path):
    p = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in random_inception_state_dict(seed=1).items()}, str(p))
    _, _, name = resolve_feature_backbone("inception-v3", p)
    assert name == "inception-v3"


@pytest.mark.slow
def test_compute_fidelity_with_inception(inception_file):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(4)]
    q = compute_fidelity(imgs, imgs, backbone="inception-v3", weights=inception_file, size=32)
    assert q["backbone"] == "inception-v3"
    assert abs(q["fid"]) < 1e-3
    assert q["is_mean"] is not None and q["is_mean"] >= 1.0 - 1e-6
    # IS of copies of one image: p(y|x) = p(y), so KL = 0 and IS = 1 exactly.
    q1 = compute_fidelity(imgs, [imgs[0]] * 4, backbone="inception-v3", weights=inception_file, size=32)
    assert q1["is_mean"] == pytest.approx(1.0, abs=1e-5)


def test_wrong_shape_inception_weights_name_the_file(tmp_path):
    p = tmp_path / "wrong.pth"
    sd = random_inception_state_dict()
    sd["fc.weight"] = torch.zeros(10, 2048)
    torch.save(sd, p)
    with pytest.raises(DefectforgeError) as e:
        resolve_feature_backbone("inception-v3", p)
    msg = str(e.value)
    assert str(p) in msg and "fc.weight" in msg and "\n" not in msg


def test_other_network_weights_are_rejected(tmp_path):
    p = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet().state_dict(), p)
    with pytest.raises(DefectforgeError, match="missing keys"):
        resolve_feature_backbone("inception-v3", p)
    with pytest.raises(DefectforgeError, match=r"alexnet.pth: weights do not fit torchvision vgg16"):
        resolve_lpips_backbone("vgg16", p)


def test_pickled_objects_are_refused(tmp_path):
    p = tmp_path / "evil.pth"
    torch.save({"net": torchvision.models.alexnet()}, p)  # a whole module: needs unpickling
    with pytest.raises(DefectforgeError, match="evil.pth: not a readable tensor-only weights file"):
        resolve_lpips_backbone("alexnet", p)


def test_alexnet_lpips_weights_are_copied_into_the_lpips_slices(tmp_path):
    p = tmp_path / "alexnet-owt-7be5be79.pth"
    tv = torchvision.models.alexnet()
    torch.save(tv.state_dict(), p)
    net, name = resolve_lpips_backbone("alexnet", p)
    assert name == "alexnet+lpips-v0.1-lin"
    assert torch.equal(net.net.slice1[0].weight, tv.features[0].weight)
    assert torch.equal(net.net.slice5._modules["10"].weight, tv.features[10].weight)
    # the learned LPIPS heads shipped with torchmetrics are loaded (not uniform ones)
    assert not torch.all(net.lins[0].model[-1].weight == 1)


def test_missing_weights_and_unknown_names():
    with pytest.raises(DefectforgeError, match="needs a local weights path"):
        resolve_feature_backbone("inception-v3")
    with pytest.raises(DefectforgeError, match="unknown quality backbone"):
        resolve_feature_backbone("resnet50")
    with pytest.raises(DefectforgeError, match="weights file not found"):
        resolve_lpips_backbone("alexnet", "/nonexistent/alex.pth")


def test_random_backbones_are_deterministic():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f1, _, _ = resolve_feature_backbone("random-vgg11-seed0")
    f2, _, _ = resolve_feature_backbone("random-vgg11-seed0")
    f3, _, _ = resolve_feature_backbone("random-vgg11-seed1")
    assert torch.equal(f1(x), f2(x)) and not torch.equal(f1(x), f3(x))

"""The U-Net detector trains a few steps, evaluates to metrics in [0, 1], saves as safetensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectforge.detector import evaluate_detector, load_detector, predict_maps, save_detector, train_detector
from defectforge.detector.unet import UNet
from defectforge.errors import DataError, DefectforgeError
from defectforge.metrics.detection import DETECTION_KEYS

SIZE = 32
TINY = dict(epochs=2, batch_size=4, size=SIZE, base_channels=4, depth=3, lr=3e-3)


def _items(n: int, seed: int):
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        im = rng.integers(90, 130, (SIZE + 8, SIZE + 8, 3), dtype=np.uint8)  # resized to SIZE
        m = np.zeros(im.shape[:2], bool)
        if i % 2:
            y, x = rng.integers(4, SIZE - 8, 2)
            m[y : y + 6, x : x + 6] = True
            im[m] = 20
        items.append((im, m))
    return items


@pytest.fixture(scope="module")
def trained():
    return train_detector(_items(8, 0), **TINY)


def test_unet_shapes():
    net = UNet(base_channels=4, depth=3)
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 32, 32)


def test_train_returns_model_and_curve(trained):
    model, curve = trained
    assert [r["epoch"] for r in curve] == [1, 2]
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in curve)
    assert model.config["size"] == SIZE and not model.training


def test_evaluate_returns_all_metrics_in_unit_range(trained):
    model, _ = trained
    r = evaluate_detector(model, _items(6, 1))
    for k in DETECTION_KEYS:
        assert r[k] is not None and 0.0 <= r[k] <= 1.0, (k, r[k])
    assert r["n_images"] == 6 and r["n_defect_images"] == 3 and r["eval_size"] == SIZE


def test_same_seed_same_weights_and_validation_curve():
    items, val = _items(6, 0), _items(4, 2)
    m1, c1 = train_detector(items, **{**TINY, "epochs": 1}, val_items=val)
    m2, c2 = train_detector(items, **{**TINY, "epochs": 1}, val_items=val)
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    assert c1[0]["loss"] == c2[0]["loss"]
    assert set(f"val_{k}" for k in DETECTION_KEYS) <= set(c1[0])


def test_training_learns_a_trivial_task():
    # bright squares on flat grey: a few epochs must beat chance by far on pixel AP
    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        im = np.full((SIZE, SIZE, 3), 100, np.uint8)
        m = np.zeros((SIZE, SIZE), bool)
        if i % 2:
            y, x = rng.integers(2, SIZE - 10, 2)
            m[y : y + 8, x : x + 8] = True
            im[m] = 250
        items.append((im, m))
    model, curve = train_detector(items, **{**TINY, "epochs": 8})
    assert curve[-1]["loss"] < curve[0]["loss"]
    r = evaluate_detector(model, items)
    assert r["pixel_ap"] > 0.5 and r["image_auroc"] > 0.9


def test_save_load_roundtrip(trained, tmp_path):
    model, _ = trained
    p = save_detector(model, tmp_path / "detector.safetensors")
    m2 = load_detector(p)
    ims = [im for im, _ in _items(2, 3)]
    assert np.array_equal(predict_maps(model, ims), predict_maps(m2, ims))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DefectforgeError, match="junk.safetensors: not a defectforge detector"):
        load_detector(tmp_path / "junk.safetensors")


def test_bad_input_errors():
    items = _items(2, 0)
    with pytest.raises(DataError, match=r"train_items\[1\]: mask shape"):
        train_detector([items[0], (items[1][0], items[1][1][:5])], **TINY)
    with pytest.raises(DefectforgeError, match="detector.epochs"):
        train_detector(items, **{**TINY, "epochs": 0})
    with pytest.raises(DataError, match="no \\(image, mask\\) pairs"):
        train_detector([], **TINY)


def test_same_step_budget_with_synthetic_data_and_cosine_decay():
    real, syn = _items(6, 0), _items(10, 5)
    syn = [(im, m) for im, m in syn if m.any()]
    m_real, c_real = train_detector(real, **{**TINY, "epochs": 2})
    m_syn, c_syn = train_detector(real, synthetic_items=syn, **{**TINY, "epochs": 2})
    # the budget counts passes over the real set: synthetic samples add no steps
    assert [r["step"] for r in c_real] == [r["step"] for r in c_syn] == [2, 4]
    assert c_real[-1]["lr"] == pytest.approx(0.0, abs=1e-12) and c_real[0]["lr"] < TINY["lr"]
    # same seed, same initial weights; the synthetic samples change what is learned
    assert any(not torch.equal(a, b) for a, b in zip(m_real.state_dict().values(), m_syn.state_dict().values()))
    m_seed1, _ = train_detector(real, **{**TINY, "epochs": 2, "seed": 1})
    assert any(not torch.equal(a, b) for a, b in zip(m_real.state_dict().values(), m_seed1.state_dict().values()))


def test_prepared_tensors_train_like_items():
    from defectforge.detector import prepare_items

    items = _items(6, 0)
    m1, _ = train_detector(items, **{**TINY, "epochs": 1})
    m2, _ = train_detector(prepare_items(items, SIZE), **{**TINY, "epochs": 1})
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(DataError, match="prepared at size 16"):
        train_detector(prepare_items(items, 16), **{**TINY, "epochs": 1})


def test_detector_params_seeds():
    from defectforge.errors import ParamsError
    from defectforge.params.file import parse_params

    assert parse_params({"detector": {"seeds": [4, 2]}}).detector.seeds == [4, 2]
    with pytest.raises(ParamsError, match="detector.seeds: .*distinct"):
        parse_params({"detector": {"seeds": [1, 1]}})
    with pytest.raises(ParamsError, match="detector.seeds"):
        parse_params({"detector": {"seeds": []}})
    with pytest.raises(ParamsError, match="detector.seed: unknown key"):
        parse_params({"detector": {"seed": 0}})
    d = parse_params({"detector": {"scale": 0.5, "patch": 64, "depth": 3, "norm": "batch", "score_pool": 3}}).detector
    assert (d.scale, d.patch, d.norm, d.score_pool) == (0.5, 64, "batch", 3)
    with pytest.raises(ParamsError, match="detector: .*patch .* 60 must be divisible by 2\\*\\*\\(depth-1\\) = 8"):
        parse_params({"detector": {"patch": 60, "depth": 4}})
    with pytest.raises(ParamsError, match="detector.norm"):
        parse_params({"detector": {"norm": "layer"}})


def test_batchnorm_detector_saves_and_loads(tmp_path):
    model, _ = train_detector(_items(6, 0), **{**TINY, "epochs": 1, "norm": "batch"})
    assert model.config["norm"] == "batch"
    m2 = load_detector(save_detector(model, tmp_path / "bn.safetensors"))
    ims = [im for im, _ in _items(2, 3)]
    assert m2.config["norm"] == "batch" and np.array_equal(predict_maps(model, ims), predict_maps(m2, ims))


def _tall_item(h: int = 40, w: int = 90, seed: int = 0):
    rng = np.random.default_rng(seed)
    im = rng.integers(90, 130, (h, w, 3), dtype=np.uint8)
    m = np.zeros((h, w), bool)
    m[30:33, 70:76] = True  # a small defect near a corner of a non-square image
    im[m] = 20
    return im, m


def test_patch_sampler_defect_patches_hold_defect_pixels_and_are_seeded():
    from defectforge.detector import prepare_items, sample_patch

    prep = prepare_items([_tall_item(), (np.full((40, 90, 3), 100, np.uint8), np.zeros((40, 90), bool))], 32, scale=1.0)
    assert prep.xs[0].shape == (3, 40, 90) and len(prep.defect_pixels[0]) == 18 and len(prep.defect_pixels[1]) == 0

    def draw(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_patch(prep.xs[0], prep.ys[0], prep.defect_pixels[0], 16, torch.rand(3, generator=g)) for _ in range(50)]

    a, b, c = draw(0), draw(0), draw(1)
    for x, y in a:
        assert x.shape == (3, 16, 16) and y.shape == (1, 16, 16)
        assert y.sum() > 0  # every defect patch holds defect pixels
        assert torch.equal((x[0] < -0.5).float(), y[0])  # and image and mask are cut at the same place
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))  # same seed, same patches
    assert any(not torch.equal(p[0], q[0]) for p, q in zip(a, c))
    # defect-free image: uniform corner; an image smaller than the patch is padded
    x, y = sample_patch(prep.xs[1], prep.ys[1], prep.defect_pixels[1], 64, torch.tensor([0.5, 0.99, 0.99]))
    assert x.shape == (3, 64, 64) and y.sum() == 0


def test_whole_image_evaluation_of_a_non_square_image():
    from defectforge.detector import prepare_items, ragged_detection_metrics
    from defectforge.metrics.detection import detection_metrics

    im, m = _tall_item(42, 70)
    model, _ = train_detector([(im, m), _tall_item(42, 70, 1)], **{**TINY, "epochs": 1, "patch": 16, "scale": 0.5})
    (pm,) = predict_maps(model, [im])
    assert pm.shape == (21, 35)  # aspect ratio kept, not squashed to SIZE x SIZE
    # fully convolutional on the reflect-padded whole image, cropped back
    x = prepare_items([(im, m)], SIZE, scale=0.5).xs[0][None]
    ref = torch.sigmoid(model(torch.nn.functional.pad(x, (0, 1, 0, 3), mode="reflect")))[0, 0, :21, :35]
    np.testing.assert_allclose(pm, ref.detach().numpy(), atol=1e-6)
    # metrics over images of different sizes: cutting one image into two along a row that no
    # region crosses changes no pixel metric (regions are labelled per image, no padding pixels)
    rng = np.random.default_rng(0)
    s = rng.random((20, 30))
    g = np.zeros((20, 30), bool)
    g[2:5, 3:9] = g[12:18, 20:22] = g[14, 5] = True
    s[g] += 0.4 * rng.random(int(g.sum()))
    whole = detection_metrics([0.5], [1], s[None], g[None])
    parts = ragged_detection_metrics([0.9, 0.1], [1, 0], [s[:8], s[8:]], [g[:8], g[8:]])
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert parts[k] == pytest.approx(whole[k], abs=1e-9), k
    assert parts["n_regions"] == whole["n_regions"] == 3 and parts["image_auroc"] == 1.0


def test_epochs_budget_counts_passes_over_each_runs_union():
    # 6 real items + 5 synthetic defect items, batch 4, 2 epochs:
    #   steps budget:  2 * ceil(6 / 4) = 2 * 2 = 4 steps (synthetic samples add none)
    #   epochs budget: 2 * ceil((6 + 5) / 4) = 2 * 3 = 6 steps; real-only alone 2 * ceil(6 / 4) = 4
    real = _items(6, 0)
    syn = [(im, m) for im, m in _items(10, 5) if m.any()]
    assert len(syn) == 5
    kw = {**TINY, "epochs": 2, "base_channels": 4, "depth": 2}
    _, c_steps = train_detector(real, synthetic_items=syn, **kw)
    _, c_epochs = train_detector(real, synthetic_items=syn, budget="epochs", **kw)
    _, c_real = train_detector(real, budget="epochs", **kw)
    assert [r["step"] for r in c_steps] == [2, 4]
    assert [r["step"] for r in c_epochs] == [3, 6] and [r["epoch"] for r in c_epochs] == [1, 2]
    assert [r["step"] for r in c_real] == [2, 4]
    # the synthetic protocol's steps budget is counted from the whole real split it was given the size of:
    # 2 * ceil(10 / 4) = 6 steps although only 3 normal images are trained on
    normals = [it for it in real if not it[1].any()]
    _, c_syn = train_detector(normals, synthetic_items=syn, real_set_size=10, **kw)
    assert len(normals) == 3 and [r["step"] for r in c_syn] == [3, 6]
    with pytest.raises(DefectforgeError, match="detector.budget"):
        train_detector(real, budget="seconds", **kw)


def test_detector_params_protocol_and_budget():
    from defectforge.params.file import parse_params
    from defectforge.errors import ParamsError

    d = parse_params({}).detector
    assert (d.protocol, d.budget) == ("mixed", "steps")  # today's behaviour by default
    d = parse_params({"detector": {"protocol": "both", "budget": "epochs"}}).detector
    assert (d.protocol, d.budget) == ("both", "epochs")
    with pytest.raises(ParamsError, match=r"^params.yaml: detector.protocol: got 'real'; allowed: 'mixed', 'synthetic' or 'both'$"):
        parse_params({"detector": {"protocol": "real"}})
    with pytest.raises(ParamsError, match=r"^params.yaml: detector.budget: got 'time'; allowed: 'steps' or 'epochs'$"):
        parse_params({"detector": {"budget": "time"}})


def test_default_steps_budget_is_todays_training():
    # the stage passes real_set_size = len(real) in the mixed protocol: the same weights as the call without it
    real, syn = _items(6, 0), [(im, m) for im, m in _items(6, 5) if m.any()]
    kw = {**TINY, "epochs": 1, "depth": 2}
    m_old, c_old = train_detector(real, synthetic_items=syn, **kw)
    m_new, c_new = train_detector(real, synthetic_items=syn, budget="steps", real_set_size=len(real), **kw)
    assert [r["step"] for r in c_old] == [r["step"] for r in c_new] == [2]
    assert all(torch.equal(a, b) for a, b in zip(m_old.state_dict().values(), m_new.state_dict().values()))

"""The detector's auto resolution, patches, norm and score pool follow the data's sizes."""

import math

import numpy as np
import pytest

from defectforge.detector.resolution import MIN_DEFECT_PX, data_sizes, resolve
from defectforge.params.file import parse_params


AUTO = {"size": 64, "scale": "auto", "patch": "auto", "norm": "auto", "score_pool": "auto"}  # params.yaml's


def _pairs(h, w, diameters, types):
    out = []
    for d in diameters:
        m = np.zeros((h, w), bool)
        yy, xx = np.mgrid[:h, :w]
        m[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 <= (d / 2) ** 2] = True
        out.append((np.zeros((h, w, 3), np.uint8), m))
    return out + [(np.zeros((h, w, 3), np.uint8), np.zeros((h, w), bool))], [*types, "good"]


def test_sizes_are_the_median_short_side_and_the_smallest_types_median_diameter():
    pairs, types = _pairs(250, 600, [10, 12, 14, 40, 44], ["hole", "hole", "hole", "break", "break"])
    s = data_sizes(pairs, types)
    assert s["short_side"] == 250
    # equivalent diameter of a rasterised disk of diameter d is about d
    assert s["defect_px"] == pytest.approx(12, abs=0.6) and s["defect_px_by_type"]["break"] == pytest.approx(42, abs=1)


def test_magnetic_tile_sizes_resolve_to_what_made_the_detector_learn():
    # Magnetic Tile: short side 253 px, blowholes 11.8 px across (measured on the library's split)
    p = resolve(parse_params({"detector": AUTO}).detector, {"short_side": 253.0, "defect_px": 11.8})
    assert p.scale == 0.43 and p.scale * 11.8 >= MIN_DEFECT_PX  # 64 px short side would leave 3 px blowholes
    assert p.patch == p.size == 64 and p.norm == "batch"
    assert p.score_pool == 5  # the largest odd window inside a 5.07 px blowhole


def test_the_built_in_samples_sizes_keep_whole_images_at_size():
    p = resolve(parse_params({"detector": AUTO}).detector, {"short_side": 128.0, "defect_px": 10.2})
    assert (p.scale, p.patch, p.norm, p.score_pool) == (None, None, "group", 5)


def test_large_images_with_large_defects_are_resized_to_size_and_trained_on_whole_images():
    p = resolve(parse_params({"detector": AUTO}).detector, {"short_side": 1024.0, "defect_px": 200.0})
    assert (p.scale, p.patch, p.norm, p.score_pool) == (None, None, "group", 9)


def test_tiny_defects_are_never_upsampled_past_the_original():
    p = resolve(parse_params({"detector": AUTO}).detector, {"short_side": 900.0, "defect_px": 2.0})
    assert p.scale == 1.0 and p.patch == 64 and p.score_pool == 1


def test_explicit_values_are_kept():
    d = parse_params({"detector": {"scale": 0.5, "patch": 64, "norm": "group", "score_pool": 3}}).detector
    p = resolve(d, {"short_side": 128.0, "defect_px": 4.0})
    assert (p.scale, p.patch, p.norm, p.score_pool) == (0.5, 64, "group", 3)


def test_no_defect_image_keeps_size():
    p = resolve(parse_params({"detector": AUTO}).detector, {"short_side": 300.0, "defect_px": None})
    assert p.scale is None and p.score_pool == 1


@pytest.mark.parametrize("bad", [{"scale": "big"}, {"patch": "auto2"}, {"score_pool": 0}, {"norm": "layer"}])
def test_bad_values_name_the_key(bad):
    with pytest.raises(Exception, match=next(iter(bad))):
        parse_params({"detector": bad})


def test_the_stage_resolves_auto_per_category_from_its_real_training_data(sample_manifests, tmp_path):
    """On the test sample (small images, defects >= 5 px) params.yaml's auto keeps whole images at size."""
    from defectforge.pipeline.detector import run as run_detector

    _, split = sample_manifests
    p = parse_params({"detector": {**AUTO, "epochs": 1, "base_channels": 4, "depth": 2, "seeds": [0]}}).detector
    det = run_detector(p, split, [], None, tmp_path / "d", progress=False)
    for r in det["resolution"].values():
        factor = 64 / r["short_side_px"]
        assert r["defect_px"] * factor >= MIN_DEFECT_PX  # short side 64 px keeps the defects >= 5 px across
        assert (r["scale"], r["patch"], r["norm"]) == (None, None, "group")
        across = r["defect_px"] * factor
        assert r["score_pool"] % 2 == 1 and r["score_pool"] <= across < r["score_pool"] + 2

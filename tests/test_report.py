"""The HTML report is one self-contained file with the grids, tables, backbone names and curves."""

from __future__ import annotations

import re

import numpy as np

from defectforge.report import SampleGrid, overlay, render_report, write_report


def _pair(seed):
    rng = np.random.default_rng(seed)
    im = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    m = np.zeros((40, 40), bool)
    m[10:20, 12:25] = True
    return im, m


def test_report_is_self_contained_with_tables(tmp_path):
    quality = [
        {"defect_type": "crack", "method": "copy-paste", "n_real": 3, "n_fake": 6, "fid": 12.5,
         "kid_mean": 0.01, "kid_std": 0.002, "is_mean": None, "is_skipped": "IS needs a trained classifier",
         "lpips": 0.3, "ic_lpips": 0.2, "backbone": "random-vgg11-seed0",
         "lpips_backbone": "random-alexnet-seed0+uniform-lin"},
    ]
    det = [
        {"defect_type": "crack", "run": "real-only", "image_auroc": 0.7, "pixel_ap": 0.3, "aupro": 0.5},
        {"defect_type": "crack", "run": "copy-paste", "image_auroc": 0.8, "pixel_ap": 0.25, "aupro": 0.6},
    ]
    curves = {"real-only": [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.7}],
              "copy-paste": [{"epoch": 1, "loss": 0.9, "val_pixel_ap": 0.2}, {"epoch": 2, "loss": 0.5, "val_pixel_ap": 0.4}]}
    grids = [SampleGrid("crack", [_pair(0), _pair(1)], {"copy-paste": [_pair(2)]})]
    p = write_report(tmp_path / "report.html", title="magnetic-tile v3", grids=grids, quality_rows=quality,
                     detector_rows=det, curves=curves, meta={"dataset_version": "v3"})
    html = p.read_text()
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<(script|link)\b", html)
    assert not re.search(r'src="(?!data:image/png;base64,)', html)  # every image embedded
    assert html.count("data:image/png;base64,") == 3
    assert "random-vgg11-seed0" in html and "random-alexnet-seed0+uniform-lin" in html
    assert "not comparable with published numbers" in html
    assert 'class="baseline"' in html and html.count('class="baseline"') == 1
    assert "+0.1000" in html and "-0.0500" in html  # deltas to the real-only baseline
    assert "IS needs a trained classifier" in html  # skipped metric shown with its reason
    assert html.count("<svg") == 2 and "<polyline" in html  # loss and val_pixel_ap charts
    assert "<table>" in html and "12.5000" in html


def test_overlay_marks_the_mask_in_red():
    im = np.full((10, 10, 3), 128, np.uint8)
    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    o = overlay(im, m)
    assert (o[~m] == 128).all()
    assert (o[2, 2] == [255, 0, 0]).all()  # boundary
    assert o[5, 5, 0] > 128 and o[5, 5, 1] < 128  # tinted interior


def test_empty_report_renders_and_escapes():
    html = render_report(title="<b>x</b>")
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "No samples" in html

"""The HTML report and the dataset card: self-contained, the sample grid at the top (every method
column, failures first), and the detector's and realism's results said in words."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

from defectforge.publish.report import Sample, SampleGrid, failures_first, overlay, render_report, write_report


def _pair(seed):
    rng = np.random.default_rng(seed)
    im = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    m = np.zeros((40, 40), bool)
    m[10:20, 12:25] = True
    return im, m


def _sample(seed, label, qc_pass=True, reasons=()):
    im, m = _pair(seed)
    return Sample(im, m, qc_pass, reasons, label)


def _comparison(category, method, metric, diff, lo, hi, verdict, n=3):
    return {"category": category, "defect_type": "all", "method": method, "metric": metric, "mean_diff": diff,
            "ci_low": lo, "ci_high": hi, "n_seeds": n, "verdict": verdict}


# A details.json of the new detector stage: brick learned (one method hurts, one has no
# measurable effect), gravel did not learn.
DETECTOR = {
    "budget": {"size": 64, "epochs": 8, "seeds": [0, 1, 2]},
    "learned": {"brick": {"learned": True, "reason": "", "image_auroc_real_only": 0.91},
                "gravel": {"learned": False, "reason": "real-only image AUROC 0.48 is not above 0.5",
                           "image_auroc_real_only": 0.48}},
    "comparisons": [
        _comparison("brick", "copy-paste", "pixel_ap", 0.012, -0.021, 0.043, "no measurable effect"),
        _comparison("brick", "inversion", "pixel_ap", -0.52, -0.61, -0.43, "hurts"),
        _comparison("gravel", "copy-paste", "pixel_ap", 0.31, 0.2, 0.4, "detector did not learn"),
        _comparison("gravel", "inversion", "pixel_ap", 0.05, 0.01, 0.09, "detector did not learn"),
    ],
    "per_category": {
        "brick": {"real-only": {"pixel_ap": 0.54}, "inversion": {"pixel_ap": 0.02}},
        "gravel": {"real-only": {"pixel_ap": 0.11}, "copy-paste": {"pixel_ap": 0.4217}},
    },
}
DETECTOR_ROWS = [{"defect_type": c, "run": run, **m} for c, runs in DETECTOR["per_category"].items() for run, m in runs.items()]

REALISM_SETS = [
    {"category": "brick", "defect_type": "crack", "method": "copy-paste", "saturation": 0.0, "saturation_real": 0.0,
     "intensity_distance": 0.4, "contrast_median": -30.0, "contrast_real_iqr": [-45.0, -20.0],
     "c2st_accuracy": 0.7, "c2st_real_vs_real": 0.52, "backbone": "random-vgg11-seed0"},
    {"category": "brick", "defect_type": "crack", "method": "inversion", "saturation": 0.67, "saturation_real": 0.0,
     "intensity_distance": 2.5, "contrast_median": -90.0, "contrast_real_iqr": [-45.0, -20.0],
     "c2st_accuracy": 0.97, "c2st_real_vs_real": 0.52, "backbone": "random-vgg11-seed0"},
]


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
    assert html.count("data:image/png;base64,") == 3 * 4  # per sample: image, mask, overlay crops + whole
    assert "random-vgg11-seed0" in html and "random-alexnet-seed0+uniform-lin" in html
    assert "not comparable with published numbers" in html
    assert 'class="baseline"' in html and html.count('class="baseline"') == 1
    assert "+0.1000" in html and "-0.0500" in html  # deltas to the real-only baseline
    assert "IS needs a trained classifier" in html  # skipped metric shown with its reason
    assert html.count("<svg") == 2 and "<polyline" in html  # loss and val_pixel_ap charts
    assert "<table>" in html and "12.5000" in html
    # detector rows without `comparisons`: a single-seed run, said so, not ranked
    assert "one seed per condition" in html and "not to be ranked" in html


def test_grid_is_at_the_top_with_every_method_column_in_order():
    grids = [SampleGrid("brick / crack", [_pair(0)],
                        {"inversion": [_pair(1)], "blended": [_pair(2)], "copy-paste": [_pair(3)]})]
    html = render_report(title="t", grids=grids, quality_rows=REALISM_SETS, detector=DETECTOR, detector_rows=DETECTOR_ROWS)
    heads = re.findall(r"<th>([a-z-]+)<br><small>\d+ samples?", html)
    assert heads == ["real", "copy-paste", "inversion", "blended"]
    positions = [html.index(h) for h in ("Samples: real vs synthetic", "Does the synthetic data help",
                                         "Realism of the synthetic defects", "Image quality")]
    assert positions == sorted(positions)
    # each cell: plain image, mask and overlay (cropped around the mask) and the whole image
    for kind in ("image", "mask", "overlay", "whole"):
        assert html.count(f'alt="inversion {kind}"') == 1


def _visible(html: str) -> str:
    """The text a reader sees: tags (and their attributes, such as hover titles) removed."""
    import html as _html

    return _html.unescape(re.sub(r"<[^>]+>", " ", html))


def test_grid_fits_a_laptop_screen_whatever_the_number_of_methods():
    methods = ["copy-paste", "cutpaste", "perlin", "inversion", "blended", "defectdiffu", "anomalydiffusion"]
    grids = [SampleGrid("brick / crack", [_pair(i) for i in range(6)], {m: [_pair(10 + i) for i in range(6)] for m in methods})]
    html = render_report(title="t", grids=grids, max_per_cell=4)
    table = html[html.index('<table class="samples">'):html.index("</table>", html.index('<table class="samples">'))]
    rows = re.findall(r"<tr>(.*?)</tr>", table)
    assert len(rows) == 1 + len(methods)  # a row per source: methods add rows, not columns
    for r in rows:
        assert r.count("<td>") <= 4  # at most max_per_cell samples side by side
    # 4 samples of 3 crops at 64 px and a 32 px thumbnail, plus the source column: well inside 1,400 px
    assert ".sample img{display:block;width:64px" in html and "max-width:1340px" in html


def test_a_skip_reason_every_row_shares_is_said_once():
    reason = "IS needs a trained classifier's p(y|x)"
    rows = [{"defect_type": f"crack{i}", "method": "copy-paste", "fid": 1.0 + i, "is_mean": None, "is_std": None,
             "is_skipped": reason} for i in range(5)]
    html = render_report(title="t", quality_rows=rows)
    assert _visible(html).count(reason) == 1
    assert "<th>is_mean</th>" not in html and "<th>fid</th>" in html
    rows[0] = {**rows[0], "is_mean": 3.2, "is_std": 0.1}  # one row has it: the column stays, the others say why
    html = render_report(title="t", quality_rows=rows)
    assert "<th>is_mean</th>" in html and _visible(html).count(reason) == 2 * 4  # is_mean and is_std of 4 rows


def test_each_comparison_is_shown_once():
    html = render_report(title="t", detector=DETECTOR, detector_rows=DETECTOR_ROWS)
    verdicts = _visible(html[html.index("Does the synthetic data help"):html.index("Realism of the synthetic")])
    assert verdicts.count("[-0.021, +0.043]") == 1  # the no-effect row: one table cell, no repeated list
    assert verdicts.count("[-0.610, -0.430]") == 2  # the hurting row: its table cell and the warning above it


def test_grid_puts_failures_first_with_their_reasons():
    column = [_sample(0, "pass-a"), _sample(1, "fail-b", False, ["saturated", "colour drift"]),
              _sample(2, "pass-c"), _sample(3, "fail-d", False, ["mask outside"])]
    assert [s.label for s in failures_first(column)] == ["fail-b", "fail-d", "pass-a", "pass-c"]
    html = render_report(title="t", grids=[SampleGrid("brick / crack", [_pair(9)], {"inversion": column})],
                         max_per_cell=3)
    order = [m for m in re.findall(r"(fail-b|fail-d|pass-a|pass-c)", html)]
    assert order == ["fail-b", "fail-d", "pass-a"]  # capped at 3, failures kept
    assert "QC fail: saturated, colour drift" in html and "QC fail: mask outside" in html
    assert html.count('class="sample fail"') == 2
    assert "4 samples, 2 fail QC" in html


def test_hurts_and_no_effect_are_said_in_words():
    html = render_report(title="t", detector=DETECTOR, detector_rows=DETECTOR_ROWS)
    assert "Synthetic data hurts the detector here" in html
    assert "inversion: hurts pixel AP (Δ -0.520, 95 % CI [-0.610, -0.430], 3 seeds)" in html
    assert "copy-paste: no measurable effect on pixel AP (Δ +0.012, 95 % CI [-0.021, +0.043], 3 seeds)" in html
    # the findings box above the grid names the harm too
    top = html[: html.index("Samples: real vs synthetic")]
    assert "brick: inversion: hurts pixel AP" in top


def test_detector_that_did_not_learn_gets_a_sentence_and_no_ranking():
    html = render_report(title="t", detector=DETECTOR, detector_rows=DETECTOR_ROWS)
    assert "The detector did not learn on gravel (real-only image AUROC 0.48 is not above 0.5)" in html
    assert "no method is ranked on this category" in html
    verdicts = html[html.index("Does the synthetic data help"): html.index("Realism of the synthetic")]
    gravel = verdicts[verdicts.index("<h3>gravel</h3>"):]
    assert "+0.310" not in gravel and "+0.050" not in gravel and "<table>" not in gravel
    # the raw table shows gravel's numbers without differences to real-only
    raw = html[html.index("raw numbers"):]
    assert "0.4217" in raw and "+0.3117" not in raw
    assert "-0.5200" in raw  # brick learned: its difference is shown


def test_realism_scores_with_references_and_one_line_each():
    html = render_report(title="t", quality_rows=REALISM_SETS)
    section = html[html.index("Realism of the synthetic defects"): html.index("Image quality")]
    assert "0.5 = indistinguishable" in section
    assert "67.0 %" in section and "real 0.0 %" in section
    assert "0.97 <small>(real-vs-real 0.52, copy-paste 0.7)</small>" in section
    assert "real IQR [-45, -20])</small> inside" in section  # copy-paste's -30
    assert 'real IQR [-45, -20])</small> <span class="v-hurts">outside' in section  # inversion's -90
    assert "saturated share" in section and "intensity distance" in section


def test_card_says_the_truth(tmp_path):
    from defectforge.publish.card import card as _card, headline_metrics

    df = pd.DataFrame({"method": ["copy-paste", "inversion"], "qc_pass": [True, False]})
    counts = pd.DataFrame({"category": ["brick"] * 2, "defect_type": ["crack"] * 2, "method": ["copy-paste", "inversion"], "samples": [1, 1]})
    details = {"detector": DETECTOR, "quality": {"pass_rate": 0.5, "sets": {f"s{i}": r for i, r in enumerate(REALISM_SETS)}}}
    head = headline_metrics(details)
    card = _card("v@1", df, counts, head, True, details=details)
    measured = card[card.index("## Measured"): card.index("## Headline")]
    assert "inversion: hurts pixel AP (Δ -0.520, 95 % CI [-0.610, -0.430], 3 seeds)" in measured
    assert "copy-paste: no measurable effect on pixel AP (Δ +0.012, 95 % CI [-0.021, +0.043], 3 seeds)" in measured
    assert "**Synthetic data hurts the detector** in: brick: inversion" in measured
    assert "gravel: The detector did not learn on gravel" in measured and "+0.310" not in measured
    assert "inversion: saturated in-mask share 67.0 % (real 0.0 %); C2ST accuracy 0.97" in measured
    assert "copy-paste 0.7" in measured and "0.5 = indistinguishable" in measured
    assert "`random-vgg11-seed0`" in measured and "U-Net from scratch (size 64, epochs 8, 3 seeds)" in measured
    assert head["detector.gravel.learned"] is False and head["detector.gravel.inversion.pixel_ap"] == "detector did not learn"
    assert head["detector.brick.inversion.pixel_ap"].startswith("hurts (Δ -0.520")
    assert head["realism.inversion.saturation"] == 0.67

    # the old single-seed details.json: the card says the numbers are not a ranking
    old = {"detector": {"mean": {"real-only": {"pixel_ap": 0.5}}, "per_category": {"brick": {}}}}
    card = _card("v@1", df, counts, headline_metrics(old), details=old)
    assert "One seed per condition" in card and "**not a ranking**" in card


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


def test_release_report_and_card_from_real_manifests(sample_manifests, tmp_path):
    """The release stage's wiring: grids read from a generated manifest and the split, QC merged
    (failures first), a second method's column, and the verdicts in report and card."""
    from defectforge.manifest.io import read_manifest, write_manifest
    from defectforge.params.generate import GenerateParams
    from defectforge.params.release import ReleaseParams
    from defectforge.pipeline.generate import run as run_generate
    from defectforge.pipeline.release import run as run_release

    _, split = sample_manifests
    root = run_generate(GenerateParams(n_per_defect=2, shard_size=4, seed=0), split, tmp_path / "gen", progress=False)
    cp = read_manifest(root).to_pandas()
    # a second method's rows over the same files (a fake-but-valid manifest: same schema, own ids)
    inv = cp.assign(method="inversion", sample_id=["inv" + s[3:] for s in cp.sample_id])
    write_manifest(inv, root / "inversion" / "manifest" / "part-00000.parquet", kind="synthetic", dataset_root=root)
    rows = pd.concat([cp, inv]).sort_values("sample_id")
    # per type, the inversion sample with the larger id fails: failures-first must move it up
    failed = set(rows[rows.method == "inversion"].groupby(["category", "defect_type"]).sample_id.max())
    qdir, ddir = tmp_path / "quality", tmp_path / "detector"
    qdir.mkdir(), ddir.mkdir()
    pd.DataFrame({"sample_id": rows.sample_id, "qc_pass": [s not in failed for s in rows.sample_id],
                  "qc_reasons": [["saturated"] if s in failed else [] for s in rows.sample_id]}).to_parquet(qdir / "qc.parquet")
    (qdir / "details.json").write_text(json.dumps({"pass_rate": 0.75, "sets": {f"s{i}": r for i, r in enumerate(REALISM_SETS)}}))
    (ddir / "details.json").write_text(json.dumps(DETECTOR))
    pd.DataFrame({"category": "brick", "run": "real-only", "seed": [0, 0, 1, 1], "epoch": [1, 2, 1, 2],
                  "step": [1, 2, 1, 2], "loss": [1.0, 0.4, 0.5, 0.1], "lr": 0.001}).to_csv(ddir / "curves.csv", index=False)
    out = run_release(ReleaseParams(), root, tmp_path / "release", quality=qdir, detector=ddir, split=split)
    html = (out.parent / "report.html").read_text()
    card = (out.parent / "README.md").read_text()
    blocks = html.split("<h3>")[1:]
    grid_blocks = [b for b in blocks if 'class="samples"' in b]
    assert len(grid_blocks) == cp.groupby(["category", "defect_type"]).ngroups
    for b in grid_blocks:
        heads = re.findall(r"<th>([a-z-]+)<br><small>", b)
        assert heads == ["real", "copy-paste", "inversion"]  # a row per source
        inv_row = re.findall(r"<tr>(.*?)</tr>", b)[2]
        inv = re.findall(r'<figure class="([a-z ]+)"', inv_row)
        assert inv == ["sample fail", "sample"] and "QC fail: saturated" in b  # one of two failed, shown first
        assert "test " in b  # the real column holds held-out test defects
    assert "inversion: hurts pixel AP" in html and "did not learn on gravel" in html
    # the builder keeps failures when it caps a column: with one sample per cell, the failed one
    from defectforge.publish.report import sample_grids

    for g in sample_grids(out, split, per_cell=1):
        assert [s.qc_pass for s in g.synthetic["inversion"]] == [False] and g.synthetic["inversion"][0].reasons == ("saturated",)
        assert [s.qc_pass for s in g.synthetic["copy-paste"]] == [True] and len(g.real) == 1
    assert "inversion: hurts pixel AP" in card and "did not learn on gravel" in card
    # training curves: one line per (category, run), the mean over the seeds
    assert html.count(">brick/real-only</text>") == 1 and ">0.75</text>" in html and ">0.25</text>" in html


def test_grid_crop_shows_the_defect_when_its_pieces_are_far_apart():
    """Two blobs at the top and bottom of a tall image: the crop centres on the larger one
    (a crop at the empty centre of their bounding box would show no defect)."""
    import base64
    import io

    from PIL import Image

    im = np.full((200, 60, 3), 100, np.uint8)
    m = np.zeros((200, 60), bool)
    m[2:12, 20:34] = True  # larger blob at the top
    m[192:196, 40:44] = True  # small blob at the bottom
    html = render_report(title="t", grids=[SampleGrid("a / b", [], {"copy-paste": [(im, m)]})])
    uri = re.search(r'src="data:image/png;base64,([^"]+)" alt="copy-paste mask"', html).group(1)
    crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("L"))
    assert crop.max() == 255 and (crop > 127).mean() > 0.02


def test_card_lists_sets_whose_speckle_is_several_times_the_reals():
    import pandas as pd

    from defectforge.publish.card import limitations

    df = pd.DataFrame({"qc_pass": [True, True], "qc_reasons": [[], []]})
    sets = {"brick/hole/inversion": {"speckle_ratio": 5.57}, "brick/hole/copy-paste": {"speckle_ratio": 0.81},
            "gravel/stain/blended": {"speckle_ratio": 2.0}, "x/y/z": {"speckle_ratio": None}}
    out = limitations(df, {"quality": {"sets": sets}}, {"passed": True})
    noisy = [t for t in out if t.startswith("Pixel-scale noise")]
    assert len(noisy) == 1 and "brick/hole/inversion 5.6x" in noisy[0]
    assert "copy-paste" not in noisy[0] and "gravel/stain/blended" not in noisy[0]  # 2.0 is not above 2x
    assert not [t for t in limitations(df, {"quality": {"sets": {}}}, {"passed": True}) if t.startswith("Pixel-scale")]


def _tagged(category, method, diff, lo, hi, verdict, protocol, reference, budget="epochs"):
    return {**_comparison(category, method, "pixel_ap", diff, lo, hi, verdict), "protocol": protocol, "budget": budget, "reference": reference}


# A details.json of a run with both protocols and the epochs budget: mixed against real-only,
# synthetic (no real defect in training) against copy-paste's synthetic set; gravel's mixed run
# did not learn, its synthetic one did
PROTOCOLS = {
    "protocol": "both", "protocols": ["mixed", "synthetic"], "training_budget": "epochs",
    "references": {"mixed": "real-only", "synthetic": "copy-paste"},
    "budget": {"protocol": "both", "budget": "epochs", "size": 64, "epochs": 8, "seeds": [0, 1, 2]},
    "learned_by_protocol": {
        "mixed": {"brick": {"learned": True, "reason": "real-only image AUROC 0.910 over 3 seed(s)", "image_auroc_real_only": 0.91,
                            "protocol": "mixed", "budget": "epochs"},
                  "gravel": {"learned": False, "reason": "real-only image AUROC 0.480 over 3 seed(s) is below 0.6",
                             "image_auroc_real_only": 0.48, "protocol": "mixed", "budget": "epochs"}},
        "synthetic": {"brick": {"learned": True, "reason": "copy-paste image AUROC 0.800 over 3 seed(s)", "image_auroc_reference": 0.8,
                                "reference": "copy-paste", "protocol": "synthetic", "budget": "epochs"},
                      "gravel": {"learned": True, "reason": "copy-paste image AUROC 0.700 over 3 seed(s)", "image_auroc_reference": 0.7,
                                 "reference": "copy-paste", "protocol": "synthetic", "budget": "epochs"}}},
    "comparisons": [
        _tagged("brick", "perlin", -0.2, -0.3, -0.1, "hurts", "mixed", "real-only"),
        _tagged("gravel", "perlin", 0.3, 0.2, 0.4, "detector did not learn", "mixed", "real-only"),
        _tagged("brick", "perlin", 0.07, 0.02, 0.12, "helps", "synthetic", "copy-paste"),
        _tagged("gravel", "perlin", 0.01, -0.05, 0.07, "no measurable effect", "synthetic", "copy-paste"),
    ],
    "per_category": {"brick": {"real-only": {"pixel_ap": 0.5, "protocol": "mixed", "budget": "epochs", "steps": 12},
                               "synthetic/perlin": {"pixel_ap": 0.61, "protocol": "synthetic", "budget": "epochs", "steps": 40}}},
    "mean": {"real-only": {"pixel_ap": 0.5}, "synthetic/perlin": {"pixel_ap": 0.61}},
}
PROTOCOL_ROWS = [{"defect_type": c, "run": run, **m} for c, runs in PROTOCOLS["per_category"].items() for run, m in runs.items()]


def test_report_and_card_name_protocol_and_budget_beside_every_detector_number():
    from defectforge.publish.card import card as _card, headline_metrics

    html = render_report(title="t", detector=PROTOCOLS, detector_rows=PROTOCOL_ROWS)
    verdicts = html[html.index("Does the synthetic data help"): html.index("Realism of the synthetic")]
    assert "Protocol mixed (real + synthetic defects + normal images in training), against real-only; budget epochs" in verdicts
    assert "Protocol synthetic (synthetic defects + normal images in training, no real defect image), against copy-paste; budget epochs" in verdicts
    assert "perlin: hurts pixel AP (Δ -0.200, 95 % CI [-0.300, -0.100], 3 seeds; protocol mixed vs real-only, budget epochs)" in verdicts
    assert "perlin: helps pixel AP (Δ +0.070, 95 % CI [+0.020, +0.120], 3 seeds; protocol synthetic vs copy-paste, budget epochs)" in verdicts
    assert "<caption>Δ against copy-paste</caption>" in verdicts and "<caption>Δ against real-only</caption>" in verdicts
    # gravel did not learn in the mixed protocol only: no mixed ranking, the synthetic one stands
    assert "The detector did not learn on gravel (protocol mixed, budget epochs; real-only image AUROC 0.480" in verdicts
    assert "+0.300" not in verdicts and "perlin: no measurable effect on pixel AP (Δ +0.010" in verdicts
    top = html[: html.index("Samples: real vs synthetic")]
    assert "brick: perlin: hurts pixel AP (Δ -0.200, 95 % CI [-0.300, -0.100], 3 seeds; protocol mixed vs real-only, budget epochs)" in top
    assert "brick: perlin: helps pixel AP (Δ +0.070, 95 % CI [+0.020, +0.120], 3 seeds; protocol synthetic vs copy-paste, budget epochs)" in top
    raw = html[html.index("raw numbers"):]
    # the protocol differs between rows: a column; the budget is one for all: said in the headings, not on every row
    assert "<th>protocol</th>" in raw and "<th>budget</th>" not in raw and "synthetic/perlin" in raw and "+0.1100" not in raw

    details = {"detector": PROTOCOLS}
    head = headline_metrics(details)
    assert head["detector.protocol"] == "both" and head["detector.budget"] == "epochs"
    assert head["detector.brick.perlin.pixel_ap"] == "hurts (Δ -0.200, 95 % CI [-0.300, -0.100]; protocol mixed vs real-only, budget epochs)"
    assert head["detector.brick.synthetic/perlin.pixel_ap"].endswith("; protocol synthetic vs copy-paste, budget epochs)")
    assert head["detector.gravel.perlin.pixel_ap"] == "detector did not learn (protocol mixed vs real-only, budget epochs)"
    assert head["detector.gravel.learned"] is False and head["detector.gravel.synthetic.learned"] is True
    assert head["synthetic/perlin.pixel_ap [protocol synthetic, budget epochs]"] == 0.61
    assert head["real-only.pixel_ap [protocol mixed, budget epochs]"] == 0.5
    df = pd.DataFrame({"method": ["perlin"], "qc_pass": [True]})
    counts = pd.DataFrame({"category": ["brick"], "defect_type": ["crack"], "method": ["perlin"], "samples": [1]})
    text = _card("v@1", df, counts, head, details=details)
    measured = text[text.index("## Measured"): text.index("## Headline")]
    assert "- Protocol synthetic (synthetic defects + normal images in training, no real defect image), against copy-paste; budget epochs" in measured
    assert "    - perlin: helps pixel AP (Δ +0.070, 95 % CI [+0.020, +0.120], 3 seeds; protocol synthetic vs copy-paste, budget epochs)" in measured
    assert "  - gravel: The detector did not learn on gravel (protocol mixed, budget epochs;" in measured
    assert "U-Net from scratch (protocol both, budget epochs, size 64, epochs 8, 3 seeds)" in measured


def test_report_and_card_say_when_a_protocol_has_no_reference():
    from defectforge.publish.card import card as _card, headline_metrics

    det = {"protocol": "synthetic", "protocols": ["synthetic"], "training_budget": "steps", "references": {"synthetic": None},
           "learned_by_protocol": {"synthetic": {}}, "learned": {}, "comparisons": [],
           "absolute": [{"protocol": "synthetic", "budget": "steps", "category": "brick", "defect_type": "all", "run": "perlin",
                         "metric": "pixel_ap", "mean": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n_seeds": 3}]}
    html = render_report(title="t", detector=det)
    line = "perlin: pixel AP 0.400, 95 % CI [0.300, 0.500], 3 seeds; protocol synthetic, budget steps"
    assert "no reference run (copy-paste is not among the methods): absolute numbers only" in html and line in html
    df = pd.DataFrame({"method": ["perlin"], "qc_pass": [True]})
    counts = pd.DataFrame({"category": ["brick"], "defect_type": ["crack"], "method": ["perlin"], "samples": [1]})
    head = headline_metrics({"detector": det})
    text = _card("v@1", df, counts, head, details={"detector": det})
    assert f"  - brick: {line}" in text and "absolute numbers only" in text
    assert head["detector.brick.synthetic/perlin.pixel_ap"] == "pixel AP 0.400, 95 % CI [0.300, 0.500], 3 seeds; protocol synthetic, budget steps"

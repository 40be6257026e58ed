"""refine / quality / detector stage logic on the small sample (copy-paste), with hand-made bad cases."""

import json

import numpy as np
import pandas as pd
import pytest

from defectforge.data.codec import read_mask
from defectforge.data.files import write_png
from defectforge.errors import DataError
from defectforge.params.detector import DetectorParams
from defectforge.params.generate import GenerateParams
from defectforge.params.quality import QualityParams
from defectforge.params.refine import RefineParams
from defectforge.pipeline.quality import QualityGateError, run as run_quality
from defectforge.pipeline.detector import run as run_detector
from defectforge.pipeline.refine import run as run_refine
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.publish.card import headline_metrics
from defectforge.pipeline.generate import run as run_generate


@pytest.fixture(scope="module")
def generated(sample_manifests, tmp_path_factory):
    _, split = sample_manifests
    out = tmp_path_factory.mktemp("gen") / "generated"
    return run_generate(GenerateParams(n_per_defect=2, shard_size=4), split, out, progress=False)


def test_refine_keeps_raw_masks_without_attention(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    refined = run_refine(RefineParams(), split, generated, tmp_path / "refined")
    df = read_manifest(refined).to_pandas()
    assert (df.mask_source == "raw").all() and (df.mask_area == df.raw_mask_area).all()


def test_refine_uses_attention_eq13_and_falls_back_when_empty(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    import shutil

    gen = tmp_path / "generated"
    shutil.copytree(generated, gen)
    df = read_manifest(gen).to_pandas()
    root = manifest_info(gen)["dataset_root"]
    att_paths = []
    for i, r in enumerate(df.itertuples()):
        raw = read_mask(gen / r.raw_mask_path)
        att = np.zeros(raw.shape, np.float32)
        if i > 0:  # left half of the mask's bounding box attends to the defect tokens
            ys, xs = np.nonzero(raw)
            att[:, : (xs.min() + xs.max()) // 2 + 1] = 0.9
        p = f"copy-paste/attention/{r.sample_id}.png"
        write_png(gen / p, np.rint(att * 255).astype(np.uint8))
        att_paths.append(p)
    df["attention_path"] = att_paths
    for shard in (gen / "copy-paste/manifest").glob("part-*.parquet"):
        shard.unlink()
    write_manifest(df, gen / "copy-paste/manifest/part-00000.parquet", kind="synthetic", dataset_root=root)
    refined = run_refine(RefineParams(radius=0, fallback="raw"), split, gen, tmp_path / "refined")
    out = read_manifest(refined).to_pandas().sort_values("sample_id").reset_index(drop=True)
    first = df.sample_id.iloc[0]
    assert out.set_index("sample_id").loc[first, "mask_source"] == "raw-fallback"
    rroot = manifest_info(refined)["dataset_root"]
    for r in out[out.mask_source == "attention"].itertuples():
        m, raw = read_mask(f"{rroot}/{r.mask_path}"), read_mask(f"{rroot}/{r.raw_mask_path}")
        assert m.sum() < raw.sum() and not (m & ~raw).any()  # Eq. 13: inside the target mask
    assert (out.mask_source == "attention").sum() == len(out) - 1
    # with the image-difference fallback the sample without attention gets the pixels that changed
    refined2 = run_refine(RefineParams(radius=0), split, gen, tmp_path / "refined2")
    out2 = read_manifest(refined2).to_pandas().set_index("sample_id")
    assert out2.loc[first, "mask_source"] == "difference"
    assert 0 < out2.loc[first, "mask_area"] <= out2.loc[first, "raw_mask_area"]


def test_quality_writes_per_sample_gates_and_named_backbones(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    refined = run_refine(RefineParams(), split, generated, tmp_path / "refined")
    metrics = run_quality(QualityParams(size=32), split, refined, tmp_path / "q", progress=False)
    qc = pd.read_parquet(tmp_path / "q/qc.parquet")
    assert len(qc) == 8 and qc.qc_pass.dtype == bool and "qc_bg_psnr" in qc
    for key, e in metrics["sets"].items():
        assert e["backbone"] == "random-vgg11-seed0" and e["lpips_backbone"].startswith("random-alexnet")
        assert e["fid"] is not None and e["is_mean"] is None and "classifier" in e["is_skipped"]
    # `dvc metrics show`: the pass rate and, per method, the two-sample accuracy (skipped here: None); the sets in details.json
    short = json.loads((tmp_path / "q/metrics.json").read_text())
    assert short == {"metric": "c2st", "pass_rate": metrics["pass_rate"], **{e["method"]: None for e in metrics["sets"].values()}}
    assert pd.read_csv(tmp_path / "q/c2st.csv").empty  # no set ran the test
    # realism scores beside FID / KID / LPIPS, against the held-out reals (4 per type here)
    for key, e in metrics["sets"].items():
        # copy-paste's brightness matching clips a few pixels of the dark hole floors to 0: a small share, no sample flagged
        assert 0 <= e["saturation"] < 0.1 and e["saturation_real"] == 0 and e["saturated_samples"] == 0
        assert len(e["contrast_real_iqr"]) == 2 and e["contrast_real_iqr"][0] <= e["contrast_real_iqr"][1]
        assert e["intensity_distance"] >= 0 and set(e["intensity_per_stat"]) == {"in_mask_mean", "in_mask_std", "contrast", "edge_sharpness"}
        assert e["c2st_accuracy"] is None and e["c2st_skipped"] == "needs >= 4 real and 4 synthetic crops, got 4 and 2"
        assert e["c2st_real_vs_real"] is None and "got 4" in e["c2st_real_vs_real_skipped"]
        assert {"saturation", "c2st_accuracy", "intensity_distance", "contrast_median"} <= set(e)
    assert qc.qc_saturated_share.notna().all() and not qc.qc_saturated.any() and not qc.qc_colour_drift.any()
    assert qc.qc_chroma.notna().all() and qc.qc_contrast_ring.notna().all()


def test_quality_two_sample_test_runs_with_enough_crops(sample_manifests, tmp_path):
    _, split = sample_manifests
    gen = run_generate(GenerateParams(n_per_defect=4, shard_size=4, methods=["copy-paste"]), split, tmp_path / "gen", progress=False)
    refined = run_refine(RefineParams(), split, gen, tmp_path / "refined")
    m1 = run_quality(QualityParams(size=32, c2st_folds=4), split, refined, tmp_path / "q", progress=False)
    m2 = run_quality(QualityParams(size=32, c2st_folds=4), split, refined, tmp_path / "q2", progress=False)
    for key, e in m1["sets"].items():
        assert 0 <= e["c2st_accuracy"] <= 1 and len(e["c2st_folds"]) == 4 and e["c2st_n"] == 4
        assert "logistic-regression" in e["c2st_classifier"]
        assert e["c2st_accuracy"] == m2["sets"][key]["c2st_accuracy"]  # seeded
    # the real-vs-real references need >= 8 held-out reals: 4 here, so two copies of them
    from pathlib import Path

    from defectforge.pipeline.quality import _real_defects, _real_reference

    rr = _real_defects(split, "test")
    rr = rr[(rr.category == "gravel") & (rr.defect_type == "stain")]
    ref = _real_reference(QualityParams(), 4, Path(manifest_info(split)["dataset_root"]), pd.concat([rr, rr]))
    assert len(ref["crops"]) == len(ref["stats"]) == 8 and ref["c2st_real_vs_real_skipped"] is None
    assert 0 <= ref["c2st_real_vs_real"] <= 1 and ref["intensity_distance_real_vs_real"] >= 0
    assert ref["gate"]["saturated_share"] == 0


def _confetti_copy(generated, dest, category, defect):
    """A copy of the generated samples whose (category, defect) images are saturated colour confetti in the mask."""
    import shutil

    from defectforge.data.codec import read_image

    shutil.copytree(generated, dest)
    df = read_manifest(dest).to_pandas()
    root = manifest_info(dest)["dataset_root"]
    palette = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)], np.uint8)
    rng = np.random.default_rng(0)
    hit = df[(df.category == category) & (df.defect_type == defect)]
    for r in hit.itertuples():
        im, m = read_image(f"{root}/{r.image_path}").copy(), read_mask(f"{root}/{r.raw_mask_path}")
        im[m] = palette[rng.integers(0, len(palette), int(m.sum()))]
        write_png(f"{root}/{r.image_path}", im)
    return hit.sample_id.tolist()


def test_saturated_colour_confetti_fails_its_gates_and_the_set(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    bad_ids = _confetti_copy(generated, tmp_path / "generated", "gravel", "stain")
    refined = run_refine(RefineParams(), split, tmp_path / "generated", tmp_path / "refined")
    with pytest.raises(QualityGateError, match=r"gravel/stain/copy-paste: 100% of samples are saturated > 50%"):
        run_quality(QualityParams(size=32), split, refined, tmp_path / "q", progress=False)
    gates = json.loads((tmp_path / "q/gates.json").read_text())
    assert "gravel/stain/copy-paste: 100% of samples are colour-drifted > 50%" in gates["failures"]
    assert not any(f.startswith(("brick/", "gravel/scratch")) for f in gates["failures"])
    qc = pd.read_parquet(tmp_path / "q/qc.parquet").set_index("sample_id")
    bad = qc.loc[bad_ids]
    assert bad.qc_saturated.all() and bad.qc_colour_drift.all() and not bad.qc_pass.any()
    assert all(any(r.startswith("saturated:") for r in rs) and any(r.startswith("colour drift:") for r in rs) for rs in bad.qc_reasons)
    good = qc.drop(index=bad_ids)
    assert not good.qc_saturated.any() and not good.qc_colour_drift.any()
    e = json.loads((tmp_path / "q/details.json").read_text())["sets"]["gravel/stain/copy-paste"]
    assert e["saturation"] > 0.5 and e["saturation_real"] == 0
    # the speckle score: confetti is many times noisier than the real stains, pasted real
    # brick cracks no noisier than real ones; measured per sample (not gated by default)
    sets = json.loads((tmp_path / "q/details.json").read_text())["sets"]
    assert e["speckle_ratio"] > 5 and sets["brick/crack/copy-paste"]["speckle_ratio"] < 2
    assert (bad.qc_speckle > 3 * good.qc_speckle.median()).all() and qc.qc_speckled.isna().all()


def test_failed_set_gate_fails_with_a_readable_report(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    refined = run_refine(RefineParams(), split, generated, tmp_path / "refined")
    with pytest.raises(QualityGateError, match=r"brick/crack/copy-paste: fid .* > -1"):
        run_quality(QualityParams(size=32, set_gates={"fid_max": -1.0}), split, refined, tmp_path / "q", progress=False)
    gates = json.loads((tmp_path / "q/gates.json").read_text())
    assert gates["passed"] is False and len(gates["failures"]) == 4


def test_defect_type_without_held_out_reals_is_marked_skipped(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    df = read_manifest(split).to_pandas()
    df.loc[(df.category == "brick") & (df.defect_type == "crack"), "split"] = "train"
    bad = write_manifest(df, tmp_path / "split.parquet", kind="split", dataset_root=manifest_info(split)["dataset_root"])
    refined = run_refine(RefineParams(), split, generated, tmp_path / "refined")
    metrics = run_quality(QualityParams(size=32), bad, refined, tmp_path / "q", progress=False)
    e = metrics["sets"]["brick/crack/copy-paste"]
    assert e["quality_skipped"] == "no held-out real brick/crack images to compare with" and "fid" not in e
    # a category with no held-out defects at all: the detector marks it skipped, never a silent zero
    df.loc[df.category == "gravel", "split"] = df.loc[df.category == "gravel", "split"].where(df.defect_type == "good", "train")
    bad2 = write_manifest(df, tmp_path / "split2.parquet", kind="split", dataset_root=manifest_info(split)["dataset_root"])
    det = run_detector(DetectorParams(epochs=1, size=32, base_channels=4, depth=2), bad2, refined, tmp_path / "q/qc.parquet", tmp_path / "d", progress=False)
    assert "no held-out real defect images" in det["per_category"]["gravel"]["skipped"]
    assert set(det["per_category"]["brick"]) == {"real-only", "copy-paste"}
    assert set(det["mean"]) == {"real-only", "copy-paste"}


def test_detector_paired_seeds_write_the_contract(sample_manifests, generated, tmp_path):
    _, split = sample_manifests
    refined = run_refine(RefineParams(), split, generated, tmp_path / "refined")
    out = tmp_path / "d"
    det = run_detector(DetectorParams(epochs=1, size=32, base_channels=4, depth=2, seeds=[3, 7]), split, refined, None, out, progress=False)
    on_disk = json.loads((out / "details.json").read_text())
    assert on_disk["comparisons"] == det["comparisons"] and on_disk["learned"] == det["learned"]
    keys = {"category", "defect_type", "method", "metric", "mean_diff", "ci_low", "ci_high", "n_seeds", "verdict", "protocol", "budget", "reference"}
    rows = det["comparisons"]
    # the default is today's protocol and budget: real + synthetic against real-only, the same steps for every run
    assert det["protocols"] == ["mixed"] and det["training_budget"] == "steps" and det["references"] == {"mixed": "real-only"}
    assert all((r["protocol"], r["budget"], r["reference"]) == ("mixed", "steps", "real-only") for r in rows)
    assert rows and all(set(r) == keys for r in rows)
    assert {r["metric"] for r in rows} == {"pixel_ap", "aupro", "image_auroc", "pixel_auroc"}
    assert {(r["category"], r["method"]) for r in rows} == {("brick", "copy-paste"), ("gravel", "copy-paste")}
    # "all" plus every defect type of the category, each on its own defect images + all good test images
    types = read_manifest(split).to_pandas().query("split == 'test' and defect_type != 'good'").groupby("category").defect_type.unique()
    for cat in ("brick", "gravel"):
        assert {r["defect_type"] for r in rows if r["category"] == cat} == {"all", *types[cat]}
    assert all(r["n_seeds"] == 2 for r in rows)
    # the values used are recorded per category (explicit here: as given)
    assert {c: (r["size"], r["scale"], r["patch"], r["norm"], r["score_pool"]) for c, r in on_disk["resolution"].items()} == {
        "brick": (32, None, None, "group", 9), "gravel": (32, None, None, "group", 9)}
    assert on_disk["resolution"]["brick"]["short_side_px"] == 64  # the test sample's images
    assert headline_metrics({"detector": det})["detector.brick.resolution"].startswith("short side 32 px, whole images, group norm, score pool 9")
    for cat, entry in det["learned"].items():
        assert set(entry) >= {"learned", "reason", "image_auroc_real_only"}
        verdicts = {r["verdict"] for r in rows if r["category"] == cat}
        assert verdicts == {"detector did not learn"} if not entry["learned"] else verdicts <= {"helps", "hurts", "no measurable effect"}
    # the per-seed rows are the ones the comparison is computed from: recompute one by hand
    runs = pd.DataFrame(det["runs"]).query("category == 'brick' and defect_type == 'all'").set_index(["run", "seed"])["pixel_ap"]
    diffs = [runs[("copy-paste", s)] - runs[("real-only", s)] for s in (3, 7)]
    row = next(r for r in rows if r["category"] == "brick" and r["defect_type"] == "all" and r["metric"] == "pixel_ap")
    assert row["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-4)
    half = 12.706204736174698 * np.std(diffs, ddof=1) / np.sqrt(2)  # t_{0.975, 1}
    assert row["ci_low"] == pytest.approx(np.mean(diffs) - half, abs=1e-4)
    # headline for `dvc metrics show`: Δ pixel AP averaged over the categories that learned; every interval in delta_pixel_ap.csv
    flat = json.loads((out / "metrics.json").read_text())
    ap = [c for c in rows if c["defect_type"] == "all" and c["metric"] == "pixel_ap"]
    kept = [c["mean_diff"] for c in ap if c["verdict"] != "detector did not learn"]
    assert flat == {"metric": "Δ px AP", "learned": f"{sum(v['learned'] for v in det['learned'].values())}/2",
                    "copy-paste": pytest.approx(np.mean(kept), abs=1e-3) if kept else "not learned"}
    deltas = pd.read_csv(out / "delta_pixel_ap.csv").set_index("label")
    assert set(deltas.index) == {"brick/copy-paste", "gravel/copy-paste"}
    assert deltas.loc["brick/copy-paste", "delta"] == pytest.approx(row["mean_diff"]) and deltas.loc["brick/copy-paste", "ci_low"] == pytest.approx(row["ci_low"])
    curves = pd.read_csv(out / "curves.csv")
    assert set(curves.seed) == {3, 7} and {"category", "run", "epoch", "loss"} <= set(curves.columns)
    # detector.workers = 2: the same runs on two spawned processes write the bytes of one
    # worker. Both in fresh interpreters, as in the DVC stage: in this test process an earlier
    # test may have fixed torch's kernels (e.g. AVX-512) before the stage's AVX2 pin
    import subprocess
    import sys

    code = ("import sys; from defectforge.params.detector import DetectorParams; from defectforge.pipeline.detector import run; "
            "run(DetectorParams(epochs=1, size=32, base_channels=4, depth=2, seeds=[3, 7], workers=int(sys.argv[1])), "
            "sys.argv[2], sys.argv[3], None, sys.argv[4], progress=False)")
    for w in (1, 2):
        r = subprocess.run([sys.executable, "-c", code, str(w), str(split), str(refined), str(tmp_path / f"w{w}")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    for name in ("details.json", "metrics.json", "curves.csv", "delta_pixel_ap.csv"):
        assert (tmp_path / "w2" / name).read_bytes() == (tmp_path / "w1" / name).read_bytes(), name


@pytest.fixture(scope="module")
def refined_two(sample_manifests, tmp_path_factory):
    """Refined copy-paste and Perlin samples (2 per defect type) of the small sample."""
    _, split = sample_manifests
    w = tmp_path_factory.mktemp("two")
    gen = run_generate(GenerateParams(n_per_defect=2, shard_size=4, methods=["copy-paste", "perlin"]), split, w / "gen", progress=False)
    return run_refine(RefineParams(), split, gen, w / "refined")


def _spy_train(monkeypatch):
    import defectforge.detector as detector_pkg

    calls, train = [], detector_pkg.train_detector

    def spy(train_items, *, synthetic_items=None, **kw):
        calls.append({"train": train_items, "synthetic": synthetic_items, **kw})
        return train(train_items, synthetic_items=synthetic_items, **kw)

    monkeypatch.setattr(detector_pkg, "train_detector", spy)
    return calls


def test_detector_protocols_train_on_their_sets_against_their_references(sample_manifests, refined_two, tmp_path, monkeypatch):
    import math

    _, split = sample_manifests
    calls = _spy_train(monkeypatch)
    p = DetectorParams(epochs=1, size=32, base_channels=4, depth=2, seeds=[3, 7], protocol="both", budget="epochs", workers=1)
    det = run_detector(p, split, refined_two, None, tmp_path / "d", progress=False)
    sp = read_manifest(split).to_pandas().query("split == 'train'")
    syn = read_manifest(refined_two).to_pandas()
    order = [("mixed", "real-only"), ("mixed", "copy-paste"), ("mixed", "perlin"), ("synthetic", "copy-paste"), ("synthetic", "perlin")]
    assert len(calls) == 2 * 2 * len(order)  # categories x seeds x (protocol, run), in that order
    for i, call in enumerate(calls):
        cat = ("brick", "gravel")[i // 10]
        (protocol, run), seed = order[i % 5], (3, 7)[i // 5 % 2]
        n_good, n_defect = int((sp[sp.category == cat].defect_type == "good").sum()), int((sp[sp.category == cat].defect_type != "good").sum())
        defect_images = sum(len(d) > 0 for d in call["train"].defect_pixels)
        if protocol == "synthetic":
            # AnomalyDiffusion's protocol: the method's samples + the real normal images, no real defect image
            assert defect_images == 0 and len(call["train"]) == n_good, (cat, protocol, run)
        else:
            assert defect_images == n_defect and len(call["train"]) == n_good + n_defect, (cat, protocol, run)
        n_syn = 0 if run == "real-only" else int(((syn.category == cat) & (syn.method == run)).sum())
        assert (0 if call["synthetic"] is None else len(call["synthetic"])) == n_syn and (n_syn > 0) == (run != "real-only")
        assert call["seed"] == seed and call["budget"] == "epochs" and call["real_set_size"] == n_good + n_defect
        # epochs budget: one pass over this run's own union of batch_size 8
        row = next(r for r in det["runs"] if (r["category"], r["protocol"], r["run"], r["seed"], r["defect_type"]) == (cat, protocol, run, seed, "all"))
        assert row["steps"] == math.ceil((len(call["train"]) + n_syn) / 8) and row["budget"] == "epochs"
    # each protocol against its own reference: mixed vs real-only, synthetic vs copy-paste's synthetic set
    assert det["references"] == {"mixed": "real-only", "synthetic": "copy-paste"} and det["protocols"] == ["mixed", "synthetic"]
    got = {(c["protocol"], c["method"], c["reference"]) for c in det["comparisons"]}
    assert got == {("mixed", "copy-paste", "real-only"), ("mixed", "perlin", "real-only"), ("synthetic", "perlin", "copy-paste")}
    runs = pd.DataFrame(det["runs"]).query("category == 'brick' and defect_type == 'all'").set_index(["protocol", "run", "seed"])["pixel_ap"]
    row = next(c for c in det["comparisons"] if (c["category"], c["defect_type"], c["protocol"], c["metric"]) == ("brick", "all", "synthetic", "pixel_ap"))
    diffs = [runs[("synthetic", "perlin", s)] - runs[("synthetic", "copy-paste", s)] for s in (3, 7)]
    assert row["mean_diff"] == pytest.approx(np.mean(diffs), abs=1e-4) and row["budget"] == "epochs"
    assert det["learned_by_protocol"]["synthetic"]["brick"]["reference"] == "copy-paste"
    # `dvc metrics show`: every entry names its protocol and budget
    # `dvc metrics show`: one column per compared run of each protocol (its reference is not one)
    flat = json.loads((tmp_path / "d/metrics.json").read_text())
    assert set(flat) == {"metric", "learned", "copy-paste", "perlin", "synthetic/perlin"} and flat["metric"] == "Δ px AP"
    deltas = pd.read_csv(tmp_path / "d/delta_pixel_ap.csv")
    assert set(deltas["label"]) == {f"{c}/{r}" for c in ("brick", "gravel") for r in ("copy-paste", "perlin", "synthetic/perlin")}


def test_synthetic_protocol_without_copy_paste_reports_absolute_numbers(sample_manifests, tmp_path, monkeypatch):
    _, split = sample_manifests
    gen = run_generate(GenerateParams(n_per_defect=2, shard_size=4, methods=["perlin"]), split, tmp_path / "gen", progress=False)
    refined = run_refine(RefineParams(), split, gen, tmp_path / "refined")
    calls = _spy_train(monkeypatch)
    det = run_detector(DetectorParams(epochs=1, size=32, base_channels=4, depth=2, seeds=[3, 7], protocol="synthetic"), split, refined, None,
                       tmp_path / "d", progress=False)
    assert len(calls) == 4 and all(sum(len(d) > 0 for d in c["train"].defect_pixels) == 0 for c in calls)
    assert det["references"] == {"synthetic": None} and det["comparisons"] == [] and det["learned_by_protocol"] == {"synthetic": {}}
    # no reference: `dvc metrics show` gives the absolute pixel AP, averaged over the categories
    flat = json.loads((tmp_path / "d/metrics.json").read_text())
    means = [r["mean"] for r in det["absolute"] if (r["defect_type"], r["metric"]) == ("all", "pixel_ap")]
    assert flat == {"metric": "px AP", "synthetic/perlin": pytest.approx(np.mean(means), abs=1e-3)} and len(means) == 2
    assert pd.read_csv(tmp_path / "d/delta_pixel_ap.csv").empty
    ab = [r for r in det["absolute"] if (r["category"], r["defect_type"], r["metric"]) == ("brick", "all", "pixel_ap")]
    assert len(ab) == 1 and ab[0]["run"] == "perlin" and ab[0]["ci_low"] <= ab[0]["mean"] <= ab[0]["ci_high"]
    from defectforge.publish.card import headline_metrics

    head = headline_metrics({"detector": det})
    assert head["detector.protocol"] == "synthetic" and head["detector.budget"] == "steps"
    assert head["detector.brick.synthetic/perlin.pixel_ap"].endswith("2 seeds; protocol synthetic, budget steps")

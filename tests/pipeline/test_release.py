"""The release stage on a hand-built manifest (a user's --out folder, a failed release, hashes)
and the dataset card. Publishing into a git repository with a DVC remote: tests/e2e/test_publish.py."""

import contextlib
import io
import json
import subprocess

import numpy as np
import pandas as pd
import pytest

from defectforge.data.files import sha256_file, write_png
from defectforge.errors import DataError, DefectforgeError
from defectforge.manifest.io import write_manifest
from defectforge.params.release import ReleaseParams
from defectforge.pipeline import release


def _refined(base, n=3):
    """data/generated + data/refined PNGs and a synthetic manifest over them (root data/)."""
    data = base / "data"
    rows = []
    for i in range(n):
        sid = f"{i:02d}" + "cd" * 31
        img = np.full((16, 16, 3), 40 + 20 * i, np.uint8)
        mask = np.zeros((16, 16), bool)
        mask[3:7, 5:9] = True
        sub = f"cat/crack/{sid}.png"
        rows.append(dict(sample_id=sid, category="cat", defect_type="crack", method="copy-paste",
                         image_path=f"generated/images/{sub}", mask_path=f"refined/masks/{sub}", raw_mask_path=f"generated/raw/{sub}",
                         image_sha256=write_png(data / f"generated/images/{sub}", img),
                         mask_sha256=write_png(data / f"refined/masks/{sub}", mask),
                         raw_mask_sha256=write_png(data / f"generated/raw/{sub}", mask),
                         source_image_id=f"cat/good/{i:03d}", source_sha256="0" * 64, defect_source_id=f"cat/crack/{i:03d}",
                         seed=i, params_sha256="1" * 64, method_config="{}", width=16, height=16, mask_area=16, raw_mask_area=16))
    return write_manifest(rows, data / "refined/manifest.parquet", kind="synthetic", dataset_root=data), rows


def _cli(*args):
    from defectforge.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, err.getvalue()


def _params(folder):
    f = folder / "params.yaml"
    f.write_text("release:\n  name: sample\n")
    return f


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


def test_release_refuses_a_users_folder_and_deletes_nothing(tmp_path):
    man, _ = _refined(tmp_path)
    docs = tmp_path / "mydocs"
    (docs / "sub").mkdir(parents=True)
    (docs / "sub/thesis.txt").write_text("four years of work")
    code, err = _cli("release", "--refined", man, "--out", docs, "--params", _params(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "mydocs" in err and "not made by defectforge" in err, err
    assert (docs / "sub/thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in docs.rglob("*")) == ["sub", "thesis.txt"]
    # a folder defectforge made is replaced as a whole
    out = tmp_path / "rel"
    release.run(ReleaseParams(), man, out)
    release.run(ReleaseParams(), man, out)
    assert (out / "manifest.parquet").is_file() and (out / ".defectforge").is_file()
    assert _leftovers(tmp_path) == []


def test_failed_release_leaves_nothing_behind(tmp_path):
    man, rows = _refined(tmp_path)
    (tmp_path / "data" / rows[1]["mask_path"]).unlink()  # fails midway: the manifest's check, inside the build folder
    out = tmp_path / "release"
    with pytest.raises(Exception, match="mask_path"):
        release.run(ReleaseParams(), man, out, verify=False)
    assert not out.exists() and _leftovers(tmp_path) == []
    # with an earlier good release in place, a failed one keeps it untouched
    man2, rows2 = _refined(tmp_path / "good")
    release.run(ReleaseParams(), man2, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(Exception, match="mask_path"):
        release.run(ReleaseParams(), man, out, verify=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and _leftovers(tmp_path) == []


def test_release_verifies_hashes_before_publishing(tmp_path):
    man, rows = _refined(tmp_path)
    bad = tmp_path / "data" / rows[2]["image_path"]
    write_png(bad, np.full((16, 16, 3), 250, np.uint8))  # same size, other bytes
    out = tmp_path / "release"
    with pytest.raises(DataError) as exc:
        release.run(ReleaseParams(), man, out)
    msg = str(exc.value)
    assert rows[2]["sample_id"] in msg and str(bad) in msg and "image_sha256" in msg and "\n" not in msg
    assert not out.exists() and _leftovers(tmp_path) == []
    code, err = _cli("release", "--refined", man, "--out", out, "--params", _params(tmp_path))
    assert code == 2 and err.count("\n") == 1 and rows[2]["sample_id"] in err, err
    # the check can be skipped
    release.run(ReleaseParams(), man, out, verify=False)
    assert json.loads((out / "release.json").read_text())["samples"] == 3


def _split(base):
    """A tiny source dataset (sample.json with a licence, a quarantine file) and its split manifest."""
    src = base / "src"
    rows = []
    for i, (defect, split) in enumerate([("crack", "train"), ("crack", "test"), ("good", "train")]):
        img = src / f"cat/{defect}/{i:03d}.png"
        write_png(img, np.full((16, 16, 3), 90, np.uint8))
        mask = np.zeros((16, 16), bool)
        mask[2:6, 2:6] = defect != "good"
        mpath = src / f"cat/{defect}/{i:03d}_mask.png" if defect != "good" else None
        if mpath:
            write_png(mpath, mask)
        rows.append(dict(image_id=f"cat/{defect}/{i:03d}", category="cat", defect_type=defect, image_path=f"cat/{defect}/{i:03d}.png",
                         mask_path=mpath and f"cat/{defect}/{i:03d}_mask.png", width=16, height=16,
                         image_sha256=sha256_file(img), mask_sha256=mpath and sha256_file(mpath), mask_area=int(mask.sum()),
                         origin="test", split=split, fold=0))
    (src / "sample.json").write_text(json.dumps({"name": "tiny parts", "license": "CC-BY-4.0"}))
    man = write_manifest(rows, base / "manifests/split.parquet", kind="split", dataset_root=src)
    return man


def test_card_has_provenance_limitations_and_quarantine(tmp_path):
    man, rows = _refined(tmp_path)
    split = _split(tmp_path)
    quality = tmp_path / "quality"
    quality.mkdir()
    pd.DataFrame({"sample_id": [r["sample_id"] for r in rows], "qc_pass": [True, False, False],
                  "qc_reasons": [[], ["saturated"], ["saturated", "colour drift"]]}).to_parquet(quality / "qc.parquet")
    (quality / "details.json").write_text(json.dumps({"pass_rate": 0.33, "samples": 3, "sets": {}}))
    (quality / "gates.json").write_text(json.dumps({"passed": False, "failures": ["cat/crack copy-paste: saturated share 0.40 > 0.25"]}))
    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "details.json").write_text(json.dumps({
        "learned": {"cat": {"learned": False, "image_auroc_real_only": 0.41}, "dog": {"learned": True}},
        "comparisons": [{"category": "dog", "defect_type": "all", "method": "copy-paste", "metric": "pixel_ap",
                         "mean_diff": -0.05, "ci_low": -0.08, "ci_high": -0.02, "n_seeds": 3, "verdict": "hurts"}]}))
    card = (release.run(ReleaseParams(), man, tmp_path / "release", quality=quality, detector=detector, split=split).parent / "README.md").read_text()
    prov = card[card.index("## Provenance"):]
    assert "tiny parts (licence: CC-BY-4.0)" in prov
    assert "- code: sha256 `" in prov and "`" + "1" * 64 + "`" in prov and "- copy-paste: `{}`" in prov
    limits = prov[prov.index("## Known limitations"):prov.index("## Quarantine")]
    assert "Set-level quality gates failed: cat/crack copy-paste: saturated share 0.40 > 0.25" in limits
    assert "2 of 3 samples fail the per-sample quality gates (saturated 2, colour drift 1)" in limits
    assert "Detector did not learn" in limits and "cat" in limits
    assert "Synthetic data hurts the detector: dog: copy-paste: hurts pixel AP" in limits
    assert "No method measurably helps" in limits
    assert prov[prov.index("## Quarantine"):].split("\n")[4] == "none"
    summary = json.loads((tmp_path / "release/release.json").read_text())["provenance"]
    assert summary["source_license"] == "CC-BY-4.0" and summary["quarantined"] == 0 and summary["methods"] == ["copy-paste"]

    # a quarantine file written at ingest (data.on_bad: skip) is listed; the code hash follows src/, not the commit
    (tmp_path / "manifests/source.quarantine.json").write_text(json.dumps({
        "format": "defectforge-quarantine/1", "samples": [
            {"image_id": "cat/crack/007", "reason": "empty mask", "detail": "src/cat/crack/007_mask.png: empty mask"}]}))
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=t@e", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    from defectforge.publish.card import code_sha256

    def code_line():
        text = (release.run(ReleaseParams(), man, tmp_path / "release", quality=quality, detector=detector, split=split).parent / "README.md").read_text()
        return next(ln for ln in text.splitlines() if ln.startswith("- code: sha256"))

    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src/mod.py").write_text("x = 1\n")
    git = ["git", "-c", "user.email=t@e", "-c", "user.name=t"]
    subprocess.run(git + ["add", "src/mod.py"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(git + ["commit", "-qm", "code"], cwd=tmp_path, check=True, capture_output=True)
    first = code_line()
    assert code_sha256(tmp_path) in first
    (tmp_path / "dvc.lock").write_text("a run's lock\n")  # committing a run's lock does not change the release
    subprocess.run(git + ["add", "dvc.lock"], cwd=tmp_path, check=True, capture_output=True)
    subprocess.run(git + ["commit", "-qm", "lock"], cwd=tmp_path, check=True, capture_output=True)
    assert code_line() == first
    (tmp_path / "src/mod.py").write_text("x = 2\n")  # the code does
    assert code_line() != first
    card = (tmp_path / "release/README.md").read_text()
    assert "- `cat/crack/007` (empty mask): src/cat/crack/007_mask.png: empty mask" in card


def test_card_says_which_amount_of_synthetic_data_the_evidence_supports():
    from defectforge.publish.card import _measured, supported_n

    def comp(method, lo, hi, verdict, metric="pixel_ap", protocol="mixed"):
        return {"category": "tile", "defect_type": "all", "method": method, "metric": metric, "protocol": protocol,
                "mean_diff": (lo + hi) / 2, "ci_low": lo, "ci_high": hi, "n_seeds": 5, "verdict": verdict}

    det = {"comparisons": [comp("blended", 0.01, 0.05, "helps"), comp("perlin", -0.04, 0.02, "no measurable effect"),
                           comp("copy-paste", -0.09, -0.01, "hurts"), comp("blended", -0.5, 0.5, "helps", metric="aupro"),
                           comp("perlin", 0.1, 0.2, "helps", protocol="synthetic")],
           "per_category": {"tile": {"blended": {"train_synthetic": 400}, "perlin": {"train_synthetic": 377}, "copy-paste": {"train_synthetic": 399}}},
           "learned": {"tile": {"learned": True}}}
    got = supported_n(det)
    assert got == ["tile/blended: the evidence supports 400 samples (Δ +0.030, 95 % CI [+0.010, +0.050]); larger amounts are not measured",
                   "tile/perlin: the evidence supports no amount: 377 samples had no measurable effect (Δ -0.010, 95 % CI [-0.040, +0.020])",
                   "tile/copy-paste: the evidence is against adding 399 samples (Δ -0.050, 95 % CI [-0.090, -0.010]): they hurt the detector"]
    assert "**How many synthetic samples the evidence supports**" in "\n".join(_measured({"detector": det}))


def test_release_of_a_teams_own_data_under_the_default_name_says_how_to_name_it(tmp_path, capsys):
    man, _ = _refined(tmp_path)
    split = _split(tmp_path)  # a source with sample.json: the built-in sample's marker
    release.run(ReleaseParams(), man, tmp_path / "r1", split=split)
    assert "release.name" not in capsys.readouterr().err
    (tmp_path / "src/sample.json").unlink()  # a team's own data
    release.run(ReleaseParams(), man, tmp_path / "r2", split=split)
    err = capsys.readouterr().err
    assert "named sample@" in err and "-S release.name=<name>" in err and len(err.strip().splitlines()) == 1
    release.run(ReleaseParams(name="magnetic-tile"), man, tmp_path / "r3", split=split)
    assert capsys.readouterr().err == ""


def test_release_name_is_bounded(tmp_path):
    from defectforge.params.file import parse_params

    with pytest.raises(DefectforgeError, match="release.name"):
        parse_params({"release": {"name": "a" * 200_000}})
    assert parse_params({"release": {"name": "a" * 64}}).release.name == "a" * 64


def test_release_outside_a_project_records_the_code_that_ran(tmp_path):
    import hashlib

    man, _ = _refined(tmp_path)  # tmp_path: no checkout, no dvc.yaml above it
    card = (release.run(ReleaseParams(name="own"), man, tmp_path / "release").parent / "README.md").read_text()
    line = next(x for x in card.splitlines() if x.startswith("- code: sha256"))
    assert hashlib.sha256().hexdigest() not in line  # never the hash of no file
    assert "the installed defectforge package" in line and "outside a project" in line

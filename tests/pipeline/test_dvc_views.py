"""What DVC shows of the quality and detector stages, from a real run's details (fixtures/: the built-in
run's data/detector/details.json, trimmed to what the writers read, data/quality/details.json and
data/detector/curves.csv): `dvc metrics show` fits 120 columns, `dvc plots show` draws one line per
training run and the intervals of Δ pixel AP and of the two-sample accuracy."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from defectforge.pipeline import detector, quality

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
WIDTH = 120


def _details():
    det = json.loads((FIXTURES / "detector_details.json").read_text())
    q = json.loads((FIXTURES / "quality_details.json").read_text())
    return det, q


def test_headlines_of_a_real_run():
    det, q = _details()
    # brick's real-only detector did not learn, gravel's did: each method's Δ pixel AP is gravel's
    gravel = {c["method"]: c["mean_diff"] for c in det["comparisons"]
              if (c["category"], c["defect_type"], c["metric"]) == ("gravel", "all", "pixel_ap")}
    assert len(gravel) == 5
    assert detector.dvc_metrics(det) == {"metric": "Δ px AP", "learned": "1/2", **{m: round(v, 3) for m, v in gravel.items()}}
    c2st: dict[str, list] = {}
    for e in q["sets"].values():
        c2st.setdefault(e["method"], []).append(e["c2st_accuracy"])
    assert quality.dvc_metrics(q) == {"metric": "c2st", "pass_rate": q["pass_rate"], **{m: round(float(np.mean(v)), 3) for m, v in c2st.items()}}
    # the full tables: one interval per category and method, one per set
    deltas = detector.deltas_table(det)
    assert len(deltas) == 10 and (deltas["ci_low"] <= deltas["delta"]).all() and (deltas["delta"] <= deltas["ci_high"]).all()
    assert deltas.set_index("label").loc["gravel/copy-paste", "delta"] == gravel["copy-paste"]
    sets = quality.c2st_table(q)
    assert len(sets) == 20 and set(sets["set"]) == set(q["sets"]) and (sets["ci_low"] <= sets["c2st_accuracy"]).all()


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git + DVC repository with this repo's dvc.yaml, params.yaml and plot templates, and the quality and detector
    stages' DVC files written from the real run's details."""
    repo = tmp_path_factory.mktemp("views") / "repo"
    (repo / "stages").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml"):  # dvc.yaml interpolates params
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "stages" / "plots", repo / "stages" / "plots")
    det, q = _details()
    (repo / "data/detector").mkdir(parents=True)
    (repo / "data/quality").mkdir(parents=True)
    detector.write_dvc_files(det, pd.read_csv(FIXTURES / "detector_curves.csv").to_dict("records"), repo / "data/detector")
    quality.write_dvc_files(q, repo / "data/quality")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    return repo


def _dvc(repo: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "COLUMNS": "1000"}
    r = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dvc_metrics_show_fits_a_terminal(dvc_repo):
    shown = _dvc(dvc_repo, "metrics", "show").splitlines()
    assert len(shown) == 3 and {"data/quality/metrics.json", "data/detector/metrics.json"} <= {line.split()[0] for line in shown}
    assert max(len(line) for line in shown) <= WIDTH, "\n".join(shown)
    data = json.loads(_dvc(dvc_repo, "metrics", "show", "--json"))[""]["data"]
    assert data["data/detector/metrics.json"]["data"]["learned"] == "1/2"
    assert data["data/quality/metrics.json"]["data"]["pass_rate"] == _details()[1]["pass_rate"]


def _plots(repo: Path) -> dict:
    shown = json.loads(_dvc(repo, "plots", "show", "--json"))
    return {k: v[0]["content"] for k, v in shown["data"].items() if v}


def test_dvc_plots_draw_every_run_and_the_intervals(dvc_repo):
    plots = _plots(dvc_repo)
    # training curves: one line per category (facet), run (colour) and seed (dash), 36 in all
    curves = plots["data/detector/curves.csv"]
    assert curves["facet"]["field"] == "category"
    enc = curves["spec"]["encoding"]
    assert (enc["color"]["field"], enc["strokeDash"]["field"], enc["x"]["field"], enc["y"]["field"]) == ("run", "seed", "step", "loss")
    assert len({(r["category"], r["run"], r["seed"]) for r in curves["data"]["values"]}) == 36
    # Δ pixel AP: a point and its 95 % interval per category and run; the two-sample accuracy per set the same way
    for name, x, n in (("data/detector/delta_pixel_ap.csv", "delta", 10), ("data/quality/c2st.csv", "c2st_accuracy", 20)):
        spec = plots[name]
        rule, point = spec["layer"][1]["encoding"], spec["layer"][2]["encoding"]
        assert (rule["x"]["field"], rule["x2"]["field"], point["x"]["field"]) == ("ci_low", "ci_high", x), name
        assert len(spec["data"]["values"]) == n, name

"""Does the detector learn on real data at params.yaml's defaults? Real-only, paired seeds.

    nice .venv/bin/python experiments/detector-defaults/detector_defaults.py --split /tmp/mt-dose/split.parquet \\
        --variant defaults='{}' \\
        --variant before='{"scale": null, "patch": null, "norm": "group", "score_pool": 9}' \\
        --variant tuned='<bench/mt_detector.py BENCH_DETECTOR>'

Runs the library's detector stage (:func:`defectforge.pipeline.detector.run`) on the split
with no synthetic set (real-only only), once per variant: params.yaml's ``detector`` section
(its seeds replaced by ``--seeds``) updated by the variant's JSON. Writes per variant the
real-only image AUROC, pixel AP and AUPRO with 95 % t-intervals over the seeds, what the
``auto`` settings resolved to per category, and the wall time, to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))  # mt_detector, mt_models
from mt_detector import BENCH_DETECTOR  # noqa: E402

from defectforge.detector.compare import absolute_intervals  # noqa: E402
from defectforge.params.file import parse_params
from defectforge.pipeline.detector import run as run_detector  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True)
    ap.add_argument("--variant", action="append", default=[], help="name=JSON over params.yaml's detector section ('tuned': the bench's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--work", default="/tmp/detector-defaults")
    ap.add_argument("--json", default=str(HERE / "detector-defaults.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = yaml.safe_load((ROOT / "params.yaml").read_text())["detector"]
    out = json.loads(Path(a.json).read_text()) if Path(a.json).is_file() else {}
    for v in a.variant or ["defaults={}"]:
        name, _, js = v.partition("=")
        over = BENCH_DETECTOR if js.strip() == "tuned" else json.loads(js or "{}")
        p = parse_params({"detector": {**base, "seeds": a.seeds, "workers": 1, **over}}).detector
        t = time.perf_counter()
        det = run_detector(p, a.split, [], None, Path(a.work) / name, progress=True)
        rows = absolute_intervals([r for r in det["runs"] if r["run"] == "real-only"], p.budget, ("image_auroc", "pixel_ap", "aupro"))
        out[name] = {"params": p.model_dump(mode="json"), "resolution": det.get("resolution"), "seconds": round(time.perf_counter() - t, 1),
                     "real_only": {f"{r['category']}/{r['defect_type']}/{r['metric']}": {k: r.get(k) for k in ("mean", "ci_low", "ci_high", "n_seeds")} for r in rows},
                     "learned": det.get("learned")}
        Path(a.json).write_text(json.dumps(out, indent=1))
        print(name, json.dumps({k: v for k, v in out[name]["real_only"].items() if k.endswith("/all/image_auroc") or "/all/" in k}), flush=True)


if __name__ == "__main__":
    main()

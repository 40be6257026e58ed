"""Re-read the two-sample test of finished Magnetic Tile runs with the quality stage as it is now.

    .venv/bin/python experiments/c2st-recheck/c2st_recheck.py --sets prior=/tmp/mt/refined-prior generated=/tmp/mt/refined-generated

Each ``--sets`` item is ``tag=refined_dir`` (a refine stage output of bench_magnetic_tile.py).
The quality stage (params.yaml's ``quality`` section: repeated k-fold C2ST, ``c2st_repeats``)
runs again on the same images into ``WORK/quality-recheck-<tag>``, and a table of C2ST
accuracy with its 95 % interval per (class, method) and run is written to ``--md``
(and ``--json``). The images are not regenerated: only the instrument changes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import yaml  # noqa: E402

from defectforge.params.file import parse_params
from defectforge.pipeline.quality import QualityGateError, run as run_quality  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="/tmp/mt/split.parquet")
    ap.add_argument("--sets", nargs="+", required=True, help="tag=refined_dir ...")
    ap.add_argument("--work", default="/tmp/mt")
    ap.add_argument("--json", default=str(HERE / "c2st-recheck.json"))
    ap.add_argument("--md", default=str(HERE / "c2st-recheck.md"))
    a = ap.parse_args()
    p = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).quality
    result = {}
    for item in a.sets:
        tag, refined = item.split("=", 1)
        out = Path(a.work) / f"quality-recheck-{tag}"
        t0 = time.perf_counter()
        try:
            run_quality(p, a.split, Path(refined) / "manifest.parquet" if Path(refined).is_dir() else refined, out, progress=False)
        except QualityGateError as exc:  # the numbers are written before the gate decides
            print(f"[{tag}] quality gate: {exc}", file=sys.stderr)
        sets = json.loads((out / "details.json").read_text())["sets"]
        result[tag] = {k: {"c2st_accuracy": v.get("c2st_accuracy"), "c2st_ci95": v.get("c2st_ci95"), "c2st_real_vs_real": v.get("c2st_real_vs_real"),
                           "contrast_median": v.get("contrast_median"), "intensity_distance": v.get("intensity_distance")} for k, v in sets.items()}
        print(f"[{tag}] {time.perf_counter() - t0:.0f} s", flush=True)
    Path(a.json).write_text(json.dumps({"argv": sys.argv[1:], "quality": p.model_dump(mode="json"), "runs": result}, indent=2) + "\n")
    keys = sorted({k for r in result.values() for k in r})
    lines = ["# Two-sample test, repeated k-fold, on finished Magnetic Tile runs", "",
             f"Written by `experiments/c2st-recheck/c2st_recheck.py {' '.join(sys.argv[1:])}`: the quality stage with `c2st_repeats: {p.c2st_repeats}` "
             f"({p.c2st_folds}-fold, crops at {p.c2st_size} px) on the runs' images as they are. Accuracy = mean over the repeats, "
             "[95 % Wilson interval on the 2n held-out predictions]; 0.5 = indistinguishable.", "",
             "| class / method | " + " | ".join(result) + " |", "| --- |" + " --- |" * len(result)]
    for k in keys:
        cells = []
        for r in result.values():
            v = r.get(k)
            cells.append("-" if not v or v["c2st_accuracy"] is None else f"{v['c2st_accuracy']:.3f} [{v['c2st_ci95'][0]:.2f}, {v['c2st_ci95'][1]:.2f}]")
        lines.append(f"| {k.split('/', 1)[1]} | " + " | ".join(cells) + " |")
    rvr = {k.split("/")[1]: v["c2st_real_vs_real"] for r in result.values() for k, v in r.items()}
    lines += ["", "Real vs real (two halves of the held-out reals): " + ", ".join(f"{d} {v:.3f}" for d, v in sorted(rvr.items()) if v is not None)]
    Path(a.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

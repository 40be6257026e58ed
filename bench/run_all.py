"""Run the quick ratio benchmarks of issue 9 and write the summary (`make bench`).

    python bench/run_all.py [--only sampler,di,manifest,dvc] [--repeats N] [--strict]

Runs ``bench/bench_ratios.py <name>`` for sampler, di, manifest and dvc, one fresh
process each (one torch thread, OMP_NUM_THREADS=1), which writes
bench/results/ratio-<name>.json; then writes bench/results/ratio-summary.md, the table
of docs/benchmarks.md: measurement | ours | reference | ratio | target | met? | load.
Not included: the Magnetic Tile benchmarks (they need ../shared and take hours) and
`make run` (measured by the lead on an idle machine). About 8 minutes on the shared
2-core machine at load 4; every number depends on the load, which is recorded.
``--strict``: exit 1 when a target is missed (default: report only, exit 0 unless a
benchmark failed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
NAMES = ["sampler", "di", "manifest", "dvc"]


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit.startswith("ms"):
        return f"{v:.1f} {unit}"
    return f"{v:.3g} s" if v >= 0.1 else f"{v * 1000:.0f} ms"


def summary(names: list[str]) -> str:
    lines = ["| measurement | ours | reference | ratio | target | met? | load (1-min avg, before → after) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        f = RESULTS / f"ratio-{name}.json"
        if not f.is_file():
            lines.append(f"| {name}: no result | | | | | | |")
            continue
        d = json.loads(f.read_text())
        for m in d["measurements"]:
            ratio = f"{m['ratio']:.3f}" if "ratio" in m else "—"
            if m["target"] is None:
                target, met = "(info)", "—"
            elif m["target_kind"] == "ratio":
                target, met = f"≤ {m['target']}×", "yes" if m["met"] else "**no**"
            else:
                target, met = f"≤ {m['target']} s", "yes" if m["met"] else "**no**"
            ld = m.get("load_during") or [d["load_before"], d["load_after"]]
            load = f"{ld[0][0]:.2f} → {ld[-1][0]:.2f}"
            lines.append(f"| {m['name']} | {_fmt(m['ours_median'], m['unit'])} | {_fmt(m.get('ref_median'), m['unit'])} | {ratio} "
                         f"| {target} | {met} | {load} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(NAMES), help="comma-separated subset of " + ",".join(NAMES))
    ap.add_argument("--repeats", type=int, default=None, help="passed on (default: bench_ratios.py's, 9 for sampler, else 5)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    bad = [n for n in names if n not in NAMES]
    if bad:
        ap.error(f"unknown benchmark(s) {bad}; choose from {NAMES}")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DVC_NO_ANALYTICS="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1")
    t0 = time.perf_counter()
    failed, missed = [], []
    for name in names:
        print(f"== {name} (load {Path('/proc/loadavg').read_text().split()[:3]})", flush=True)
        cmd = [sys.executable, str(REPO / "bench" / "bench_ratios.py"), name, "--profile"]
        if args.repeats:
            cmd += ["--repeats", str(args.repeats)]
        if subprocess.run(cmd, cwd=REPO, env=env).returncode != 0:
            failed.append(name)
            continue
        d = json.loads((RESULTS / f"ratio-{name}.json").read_text())
        missed += [m["name"] for m in d["measurements"] if m["met"] is False and not m["name"].startswith("candidate")]
    table = summary(names)
    total = time.perf_counter() - t0
    (RESULTS / "ratio-summary.md").write_text(
        f"<!-- written by bench/run_all.py in {total:.0f} s, {time.strftime('%Y-%m-%d %H:%M')} -->\n" + table)
    print(table)
    print(f"total {total:.0f} s; missed: {missed or 'none'}; failed: {failed or 'none'}")
    return 1 if failed or (args.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())

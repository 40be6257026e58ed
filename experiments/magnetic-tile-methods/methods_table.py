"""One table of every method on Magnetic Tile (issue 11): realism, KID / LPIPS / IC-LPIPS, detector deltas, time.

    .venv/bin/python experiments/magnetic-tile-methods/methods_table.py --run experiments/magnetic-tile-methods/magnetic-tile-all-methods.json --log /tmp/mtall.log

Reads one measured run of `bench/bench_magnetic_tile.py` with all seven methods (one
finetune, the same target masks, 5 paired detector seeds sharing one set of real-only
runs); nothing is recomputed here. ``--log`` is that run's console log: the generate
stage's per-method progress bars give the wall time per method (2 Dask workers), kept in
experiments/magnetic-tile-methods/generate-times-all-methods.json so the table can be rebuilt without it.
Writes experiments/magnetic-tile-methods/methods-comparison.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results
R = HERE
ORDER = ["copy-paste", "cutpaste", "perlin", "inversion", "blended", "defectdiffu", "anomalydiffusion"]
TIMES = R / "generate-times-all-methods.json"


def _f(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def generate_times(log: Path, n_per_method: int) -> dict[str, float]:
    """Seconds per sample per method from the last 100 % progress bar of each method (wall, 2 workers)."""
    text = log.read_text(errors="replace").replace("\r", "\n")
    out = {}
    for m, mm, ss in re.findall(r"generate\[([\w-]+)\][^\n]*100%\|[^\n]*?\[(\d+):(\d+)<", text):
        out[m] = round((int(mm) * 60 + int(ss)) / n_per_method, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(R / "magnetic-tile-all-methods.json"))
    ap.add_argument("--log", default=None)
    a = ap.parse_args()
    run = json.loads(Path(a.run).read_text())
    argv = run["argv"]
    n = int(argv[argv.index("--n-per-defect") + 1]) * 3 if "--n-per-defect" in argv else 48
    if a.log:
        TIMES.write_text(json.dumps(generate_times(Path(a.log), n), indent=2) + "\n")
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}
    quality = {(s["defect_type"], k.split("/")[-1]): s for k, s in run["quality"]["sets"].items()}
    det = {(c["defect_type"], c["method"], c["metric"]): c for c in run["detector"].get("comparisons", [])}
    learned = run["detector"].get("learned", {})
    lines = [
        "# Every method on Magnetic Tile: realism, quality, detector, time",
        "",
        f"Written by `experiments/magnetic-tile-methods/methods_table.py` from one measured run, `bench/bench_magnetic_tile.py {' '.join(argv)}` "
        "(numbers: `experiments/magnetic-tile-methods/magnetic-tile-all-methods.json`; its own page with the grid: "
        "`experiments/magnetic-tile-methods/magnetic-tile-results-all-methods.md`). One fine-tune serves every diffusion method (area-normed loss, attention "
        "loss 3.0, Algorithm 1's condition dropout 0.2 / 0.2, AAL, and AnomalyDiffusion's anomaly embedding), 16 samples per type "
        "and method on the same target masks, the library's split, and 5 paired detector seeds sharing one set of real-only runs.",
        "",
        "KID, LPIPS and IC-LPIPS use seeded random backbones (`random-vgg11-seed0`, `random-alexnet-seed0+uniform-lin`): they rank "
        "methods on the same data and are not comparable with published numbers. IC-LPIPS clusters on the type's real *training* "
        "defects, as the paper defines it. Saturated: the in-mask share at the value ends (real in brackets). C2ST: held-out accuracy "
        "of a classifier telling real from synthetic crops (0.5 = indistinguishable; real-vs-real in brackets). Δ: real + method "
        "minus real-only, mean over 5 seeds [95 % t-interval]; n.m.e. = no measurable effect (the interval contains 0). "
        "s / sample: wall seconds of the generate stage per sample on 2 Dask workers of a 2-core CPU that was also running other "
        "benchmarks (compare methods with each other, not with other machines).",
        "",
    ]
    for cat, info in learned.items():
        lines.append(f"Detector sanity ({cat}): real-only image AUROC {_f(info.get('image_auroc_real_only'))}, "
                     f"{'learned' if info.get('learned') else 'DID NOT LEARN'} ({info.get('reason', '')}).")
    lines += [
        "",
        "| class | method | saturated (real) | intensity dist. | C2ST (real-vs-real) | KID | LPIPS | IC-LPIPS | Δ pixel AP [95 % CI] | Δ AUPRO [95 % CI] | s / sample |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def ci(c):
        return "—" if c is None else f"{c['mean_diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] {c['verdict'].replace('no measurable effect', 'n.m.e.')}"

    for cls in ["blowhole", "break", "crack"]:
        for m in ORDER:
            s = quality.get((cls, m))
            if s is None:
                continue
            lines.append(
                f"| {cls} | {m} | {_f(s.get('saturation'), 4)} ({_f(s.get('saturation_real'), 4)}) | {_f(s.get('intensity_distance'))} "
                f"| {_f(s.get('c2st_accuracy'))} ({_f(s.get('c2st_real_vs_real'))}) | {_f(s.get('kid_mean'), 4)} | {_f(s.get('lpips'))} "
                f"| {_f(s.get('ic_lpips'))} | {ci(det.get((cls, m, 'pixel_ap')))} | {ci(det.get((cls, m, 'aupro')))} | {_f(times.get(m), 2)} |")
    out = HERE / "methods-comparison.md"
    if out.exists() and "\n## Findings" in out.read_text():
        old = out.read_text()
        lines += ["", old[old.index("## Findings"):].rstrip()]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

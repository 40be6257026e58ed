"""The whole DAG on Magnetic Tile (Blowhole, Crack): quality and detector tables, with times.

    .venv/bin/python bench/bench_magnetic_tile.py --root ../shared/data/magnetic-tile \\
        --workdir /tmp/mt-run --methods copy-paste [inversion blended]

Runs the same library functions as the DVC stages, in order, on a params file derived
from this repo's params.yaml (real-data budgets: larger detector, longer training),
times each stage and writes docs/magnetic-tile-results.md (+ .json). Finished stages are
reused when --reuse is given (e.g. to add a method to an earlier run).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from defectforge.evaluate import QualityGateError, run_detector, run_quality, run_refine  # noqa: E402
from defectforge.modeling import run_finetune, run_pretrain  # noqa: E402
from defectforge.params import parse_params  # noqa: E402
from defectforge.pipeline import run_generate, run_ingest, run_release, run_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(ROOT.parent / "shared/data/magnetic-tile"))
    ap.add_argument("--workdir", default="/tmp/mt-run")
    ap.add_argument("--methods", nargs="+", default=["copy-paste"])
    ap.add_argument("--pretrain-steps", type=int, default=2000)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--n-per-defect", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--max-train-good", type=int, default=80)
    ap.add_argument("--finetune-lr", type=float, default=None)
    ap.add_argument("--base-model", default=None, help="start from this (tiny or diffusers) model directory instead of pretraining")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--suffix", default="", help="docs file name suffix")
    a = ap.parse_args()
    torch.set_num_threads(1)
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["data"].update(layout="magnetic-tile", root=a.root, defect_types=["blowhole", "crack"])
    data["pretrain"].update(steps=a.pretrain_steps)
    if a.base_model:
        data["pretrain"].update(profile="pretrained", base=a.base_model)
    data["finetune"].update(steps=a.finetune_steps, lr=a.finetune_lr)
    data["generate"].update(methods=a.methods, n_per_defect=a.n_per_defect)
    data["generate"]["inversion"].update(steps=a.ddim_steps)
    data["generate"]["blended"].update(steps=a.ddim_steps)
    data["detector"].update(epochs=a.epochs, size=128, base_channels=16, depth=4, max_train_good=a.max_train_good)
    data["release"].update(name="magnetic-tile")
    p = parse_params(data, "bench params")
    w = Path(a.workdir)
    w.mkdir(parents=True, exist_ok=True)
    times = {}

    def timed(name, fn, *args, reuse_if=None, **kw):
        if a.reuse and reuse_if is not None and Path(reuse_if).exists():
            print(f"[{name}] reused", flush=True)
            return reuse_if
        t = time.perf_counter()
        out = fn(*args, **kw)
        times[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {times[name]} s", flush=True)
        return out

    diffusion = p.generate.diffusion_methods()
    source = timed("ingest", run_ingest, p.data, w / "source.parquet", reuse_if=w / "source.parquet")
    split = timed("split", run_split, p.split, source, w / "split.parquet", reuse_if=w / "split.parquet")
    if diffusion:
        timed("pretrain", run_pretrain, p.pretrain, split, w / "models/base", needed=diffusion, reuse_if=w / "models/base")
        timed("finetune", run_finetune, p.finetune, split, w / "models/base", w / "models/finetune", needed=diffusion, reuse_if=w / "models/finetune")
    gen = timed("generate", run_generate, p.generate, split, w / "generated", checkpoints=w / "models/finetune" if diffusion else None)
    refined = timed("refine", run_refine, p.refine, split, gen, w / "refined")
    try:
        timed("quality", run_quality, p.quality, split, refined, w / "quality")
    except QualityGateError as exc:
        print(f"quality gate: {exc}")
    timed("detector", run_detector, p.detector, split, refined, w / "quality/qc.parquet", w / "detector")
    timed("release", run_release, p.release, refined, w / "release", quality=w / "quality", detector=w / "detector", split=split)
    write_docs(w, times, p, a)


def write_docs(w: Path, times: dict, p, a) -> None:
    q = json.loads((w / "quality/details.json").read_text())
    d = json.loads((w / "detector/details.json").read_text())
    lines = [
        "# Magnetic Tile (Blowhole, Crack): measured",
        "",
        f"Run by `bench/bench_magnetic_tile.py --methods {' '.join(a.methods)}"
        + (f" --base-model {a.base_model}" if a.base_model else "")
        + f" --finetune-steps {a.finetune_steps} --ddim-steps {a.ddim_steps}` on a 2-core CPU (no GPU), "
        f"{p.generate.n_per_defect} synthetic samples per defect type and method; split: AnomalyDiffusion's "
        "lowest third of sorted ids per defect type for the generator and the detector's real training set, the rest held out.",
        "",
        "## Detector (U-Net, same seed and budget per run; held-out real Blowhole + Crack + defect-free test images)",
        "",
        f"Budget: {json.dumps(d['budget'])}",
        "",
        "| run | image AUROC | image AP | image F1-max | pixel AUROC | pixel AP | pixel F1-max | AUPRO | real train | synthetic train |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cat, runs in d["per_category"].items():
        for run, m in runs.items():
            lines.append(
                f"| {'**' + run + '**' if run == 'real-only' else run} | "
                + " | ".join(f"{m.get(k):.3f}" if isinstance(m.get(k), float) else str(m.get(k)) for k in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"))
                + f" | {m.get('train_real')} | {m.get('train_synthetic')} |"
            )
    lines += [
        "",
        "## Image quality (synthetic vs held-out real defects, crops around the masks)",
        "",
        "| set | FID | KID | LPIPS to nearest real | IC-LPIPS | per-sample gate pass rate | backbone | LPIPS backbone |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else "skipped"  # noqa: E731
    for key, e in q["sets"].items():
        lines.append(f"| {key} | {fmt(e.get('fid'))} | {fmt(e.get('kid_mean'))} | {fmt(e.get('lpips'))} | {fmt(e.get('ic_lpips'))} | {fmt(e.get('pass_rate'))} | {e.get('backbone')} | {e.get('lpips_backbone')} |")
    lines += [
        "",
        "The backbones named `random-*` are seeded random networks (no pretrained weights offline): "
        "their numbers rank methods on the same data and are not comparable with published FID/KID/LPIPS. "
        "IS is skipped for them (no trained classifier).",
        "",
        "## Stage times (seconds)",
        "",
        "| " + " | ".join(times) + " |",
        "| " + " | ".join("---" for _ in times) + " |",
        "| " + " | ".join(str(v) for v in times.values()) + " |",
    ]
    out = ROOT / "docs" / f"magnetic-tile-results{a.suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    (ROOT / "docs" / f"magnetic-tile-results{a.suffix}.json").write_text(json.dumps({"times": times, "quality": q, "detector": d}, indent=2, default=str) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()

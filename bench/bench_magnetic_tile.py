"""The whole factory on Magnetic Tile (Blowhole, Crack, Break): realism, quality and the
paired multi-seed detector, per method, with a side-by-side grid.

    .venv/bin/python bench/bench_magnetic_tile.py --work /tmp/mt --finetune-tag after \\
        --finetune-json '{"loss_norm": "area", "attention_loss": 3.0}' \\
        --methods copy-paste inversion blended --n-per-defect 20 --seeds 0 1 2 3 4

Models come from :mod:`mt_models` (the library's split and stages: the base model sees
only the split's defect-free training images; reused when its inputs are unchanged).
Then generate -> refine -> quality (FID/KID/LPIPS + realism scores) -> detector (real-only
vs real+<method>, paired seeds, 95 % intervals) -> release (report.html), exactly the
library functions the DVC stages call. Writes magnetic-tile-results{suffix}.md, magnetic-tile{suffix}.json
and magnetic-tile-grid{suffix}.png into --out-dir (a study's folder in experiments/), and the report under WORK.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from mt_detector import BENCH_DETECTOR  # noqa: E402
from mt_models import DEFECTS, build  # noqa: E402

from defectforge.data.codec import read_image, read_mask  # noqa: E402
from defectforge.params.file import parse_params
from defectforge.pipeline.quality import QualityGateError, run as run_quality  # noqa: E402
from defectforge.pipeline.detector import run as run_detector  # noqa: E402
from defectforge.pipeline.refine import run as run_refine  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.pipeline.generate import run as run_generate  # noqa: E402
from defectforge.pipeline.release import run as run_release  # noqa: E402
from defectforge.publish.report import largest_component  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _merge(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = _merge(d.get(k, {}), v) if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


def bench_params(a):
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    _merge(data, {
        "data": {"layout": "magnetic-tile", "root": a.root, "defect_types": DEFECTS},
        "pretrain": {"steps": a.pretrain_steps, "lr": 6e-4, **json.loads(a.pretrain_json)},
        "finetune": {"steps": a.finetune_steps, **json.loads(a.finetune_json)},
        "generate": {"methods": a.methods, "n_per_defect": a.n_per_defect, "workers": a.generate_workers, "target_placement": a.placement,
                     "target_placement_by_type": json.loads(a.placement_by_type),
                     "inversion": {"steps": a.ddim_steps, **json.loads(a.inversion_json)},
                     "blended": {"steps": a.ddim_steps, **json.loads(a.blended_json)},
                     "defectdiffu": {"steps": a.ddim_steps, **json.loads(a.defectdiffu_json)},
                     "anomalydiffusion": {"steps": a.ddim_steps, **json.loads(a.anomalydiffusion_json)}},
        "detector": {**BENCH_DETECTOR, "seeds": a.seeds, **json.loads(a.detector_json)},
        "release": {"name": "magnetic-tile"},
    })
    return parse_params(data, "bench params")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(ROOT.parent / "shared/data/magnetic-tile"))
    ap.add_argument("--work", default="/tmp/mt")
    ap.add_argument("--methods", nargs="+", default=["copy-paste", "inversion", "blended"])
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-json", default="{}", help='extra pretrain params, e.g. \'{"threads": 1}\'')
    ap.add_argument("--finetune-steps", type=int, default=250)
    ap.add_argument("--finetune-tag", default="")
    ap.add_argument("--finetune-json", default="{}")
    ap.add_argument("--finetune-dir", default=None, help="use these finetune checkpoints as they are")
    ap.add_argument("--inversion-json", default="{}")
    ap.add_argument("--blended-json", default="{}")
    ap.add_argument("--defectdiffu-json", default="{}")
    ap.add_argument("--anomalydiffusion-json", default="{}")
    ap.add_argument("--detector-json", default="{}")
    ap.add_argument("--ddim-steps", type=int, default=30)
    ap.add_argument("--n-per-defect", type=int, default=20)
    ap.add_argument("--placement", default="foreground", help="generate.target_placement (foreground | anywhere | prior | generated)")
    ap.add_argument("--placement-by-type", default="{}", help='generate.target_placement_by_type, e.g. \'{"break": "generated"}\'')
    ap.add_argument("--generate-workers", type=int, default=1, help="generate.workers (Dask processes; 1 = in-process)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tag", default="", help="names this run's output folders under WORK (default: the finetune tag)")
    ap.add_argument("--suffix", default="", help="output file name suffix")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "experiments" / "magnetic-tile-methods",
                    help="the study folder the write-up, results JSON and grid go to")
    ap.add_argument("--skip-detector", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    p = bench_params(a)
    w = Path(a.work)
    tag = a.tag or a.finetune_tag or "default"
    times: dict[str, float] = {}

    def timed(name, fn, *args, **kw):
        t = time.perf_counter()
        out = fn(*args, **kw)
        times[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {times[name]} s", flush=True)
        return out

    diffusion = p.generate.diffusion_methods()
    paths = build(w, p, finetune_tag=a.finetune_tag, finetune_dir=a.finetune_dir) if diffusion else {"split": w / "split.parquet"}
    split = paths["split"]
    gen = timed("generate", run_generate, p.generate, split, w / f"generated-{tag}", checkpoints=paths.get("finetune"))
    refined = timed("refine", run_refine, p.refine, split, gen, w / f"refined-{tag}")
    gate = "passed"
    try:
        timed("quality", run_quality, p.quality, split, refined, w / f"quality-{tag}")
    except QualityGateError as exc:
        gate = str(exc)
        print(f"quality gate: {exc}", flush=True)
    if not a.skip_detector:
        timed("detector", run_detector, p.detector, split, refined, w / f"quality-{tag}/qc.parquet", w / f"detector-{tag}")
    timed("release", run_release, p.release, refined, w / f"release-{tag}", quality=w / f"quality-{tag}",
          detector=None if a.skip_detector else w / f"detector-{tag}", split=split)
    grid = a.out_dir / f"magnetic-tile-grid{a.suffix}.png"
    render_grid(split, refined, w / f"quality-{tag}/qc.parquet", a.methods, grid)
    write_docs(w, tag, times, p, a, gate, grid, paths)


# ------------------------------------------------------------------ grid
TILE, PER_ROW = 96, 6


def _crop(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask_c = largest_component(mask)  # centre on the largest piece (real crack masks come in pieces)
    ys, xs = np.nonzero(mask_c)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    side = int(max(48, 2.0 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    h, w = mask.shape
    side = min(side, h, w)
    top, left = int(np.clip(cy - side // 2, 0, h - side)), int(np.clip(cx - side // 2, 0, w - side))
    return image[top : top + side, left : left + side], mask[top : top + side, left : left + side]


def _tile(image: np.ndarray, mask: np.ndarray, failed: bool) -> Image.Image:
    img, m = _crop(image, mask)
    im = Image.fromarray(img).resize((TILE, TILE), Image.BILINEAR)
    mm = Image.fromarray((m * 255).astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
    edge = np.asarray(mm) > 127
    from scipy import ndimage

    outline = edge & ~ndimage.binary_erosion(edge)
    ov = np.asarray(im).copy()
    ov[outline] = (255, 40, 40)
    pair = Image.new("RGB", (2 * TILE + 2, TILE), (255, 0, 0) if failed else (255, 255, 255))
    pair.paste(im, (0, 0))
    pair.paste(Image.fromarray(ov), (TILE + 2, 0))
    return pair


def render_grid(split, refined, qc_path, methods, out: Path) -> None:
    """Per class: a row of real defects, then a row per method (plain | mask outline), failures first (red frame)."""
    import pandas as pd

    src_root = Path(manifest_info(split)["dataset_root"])
    sp = read_manifest(split).to_pandas()
    root = Path(manifest_info(refined)["dataset_root"])
    syn = read_manifest(refined).to_pandas()
    if Path(qc_path).exists():
        syn = syn.drop(columns=[c for c in ("qc_pass", "qc_reasons") if c in syn.columns]).merge(pd.read_parquet(qc_path)[["sample_id", "qc_pass"]], on="sample_id", how="left")
    rows: list[tuple[str, list[Image.Image]]] = []
    for defect in DEFECTS:
        real = sp[(sp.defect_type == defect) & (sp.split == "test")].head(PER_ROW)
        rows.append((f"{defect}: real (held out)", [_tile(read_image(src_root / r.image_path), read_mask(src_root / r.mask_path), False) for r in real.itertuples()]))
        for m in methods:
            s = syn[(syn.defect_type == defect) & (syn.method == m)].copy()
            s["failed"] = ~s["qc_pass"].fillna(True).astype(bool) if "qc_pass" in s else False
            s = s.sort_values(["failed", "sample_id"], ascending=[False, True]).head(PER_ROW)
            rows.append((f"{defect}: {m}", [_tile(read_image(root / r.image_path), read_mask(root / r.mask_path), bool(r.failed)) for r in s.itertuples()]))
    label_w, pw = 170, 2 * TILE + 2
    canvas = Image.new("RGB", (label_w + PER_ROW * (pw + 6), len(rows) * (TILE + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (label, tiles) in enumerate(rows):
        y = i * (TILE + 6)
        draw.text((4, y + TILE // 2 - 6), label, fill=(0, 0, 0))
        for j, t in enumerate(tiles):
            canvas.paste(t, (label_w + j * (pw + 6), y))
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


# ------------------------------------------------------------------ docs
def _f(v, nd=3):
    return f"{v:.{nd}f}" if isinstance(v, (int, float)) and v is not None else ("-" if v is None else str(v))


def write_docs(w: Path, tag: str, times: dict, p, a, gate: str, grid: Path, paths: dict) -> None:
    q = json.loads((w / f"quality-{tag}/details.json").read_text())
    d = json.loads((w / f"detector-{tag}/details.json").read_text()) if not a.skip_detector else {}
    qc = read_manifest(w / f"release-{tag}/manifest.parquet").to_pandas()
    lines = [
        f"# Magnetic Tile (Blowhole, Crack, Break): measured{(' - ' + a.suffix.strip('-')) if a.suffix else ''}",
        "",
        "Run by `bench/bench_magnetic_tile.py " + " ".join(sys.argv[1:]) + "` on a 2-core CPU (no GPU).",
        f"Split: the library's (`split.scheme: {p.split.scheme}`): the lowest third of sorted ids per defect type trains the "
        "generator and is the detector's real training set; the rest is held out. The base model was pretrained only on the "
        f"split's defect-free training images ({paths.get('base', '-')}).",
        f"Generation: {p.generate.n_per_defect} samples per defect type and method, {a.ddim_steps} DDIM steps; "
        f"finetune {p.finetune.steps} steps per type (`{a.finetune_json}`).",
        "",
        f"![grid](magnetic-tile-grid{a.suffix}.png)",
        "",
        "Grid: per class a row of held-out real defects, then a row per method; each cell is the plain crop and the same crop "
        "with the mask outline; red frame = failed the per-sample gates (shown first).",
        "",
        "## Realism (synthetic vs held-out real defects; no downloaded weights)",
        "",
        "| set | saturated (syn / real) | intensity distance | contrast median | real contrast IQR | C2ST acc. | C2ST real-vs-real | gate pass rate | KID | LPIPS | IC-LPIPS |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, e in q["sets"].items():
        iqr = e.get("contrast_real_iqr")
        lines.append(
            f"| {key} | {_f(e.get('saturation'), 4)} / {_f(e.get('saturation_real'), 4)} | {_f(e.get('intensity_distance'))} | "
            f"{_f(e.get('contrast_median'), 1)} | {('[' + ', '.join(_f(x, 1) for x in iqr) + ']') if iqr else '-'} | {_f(e.get('c2st_accuracy'))} | "
            f"{_f(e.get('c2st_real_vs_real'))} | {_f(e.get('pass_rate'))} | {_f(e.get('kid_mean'), 4)} | {_f(e.get('lpips'))} | {_f(e.get('ic_lpips'))} |"
        )
    lines += ["", f"Quality gate: {gate}", f"Backbones: {sorted({e.get('backbone') for e in q['sets'].values()} - {None})}, "
              f"LPIPS {sorted({e.get('lpips_backbone') for e in q['sets'].values()} - {None})} (seeded random networks: rank methods on the same data, not comparable with published numbers).", ""]
    if "mask_source" in qc:
        lines += ["Refined-mask source per method (`mask_source`): " + "; ".join(
            f"{m}: " + ", ".join(f"{k} {v}" for k, v in g.value_counts().items()) for m, g in qc.groupby("method")["mask_source"]), ""]
    if d:
        lines += ["## Detector: real + synthetic vs real-only, paired seeds", "",
                  f"Budget: {json.dumps(d.get('budget', {}))}", ""]
        for cat, info in (d.get("learned") or {}).items():
            lines.append(f"- sanity, {cat}: real-only image AUROC {_f(info.get('image_auroc_real_only'))} - "
                         f"{'learned' if info.get('learned') else 'DID NOT LEARN'} ({info.get('reason', '')})")
        lines += ["", "| class | method | metric | mean Δ | 95 % CI | seeds | verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in d.get("comparisons", []):
            if r["metric"] not in ("pixel_ap", "aupro", "image_auroc"):
                continue
            lines.append(f"| {r['defect_type']} | {r['method']} | {r['metric']} | {_f(r['mean_diff'], 4)} | "
                         f"[{_f(r['ci_low'], 4)}, {_f(r['ci_high'], 4)}] | {r['n_seeds']} | {r['verdict']} |")
    lines += ["", "## Stage times (seconds)", "", "| " + " | ".join(times) + " |", "| " + " | ".join("---" for _ in times) + " |",
              "| " + " | ".join(str(v) for v in times.values()) + " |"]
    out = a.out_dir / f"magnetic-tile-results{a.suffix}.md"
    out.write_text("\n".join(lines) + "\n")
    (a.out_dir / f"magnetic-tile{a.suffix}.json").write_text(
        json.dumps({"argv": sys.argv[1:], "times": times, "quality": q, "detector": d, "gate": gate}, indent=2, default=str) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()

"""Realism ablation of the diffusion samplers: which fix removes the saturated blobs.

For one category of a split manifest and its fine-tuned checkpoints (the layout of
``defectforge.modeling.run_finetune``), make N samples per defect type with the
library's plan (normal image, seed, target mask from ``sample_target_mask``, exactly
as the generate stage does) for a ladder of sampler variants: the old behaviour
first, then one fix added at a time (cumulative), then guidance w = 1 and 1.5 on
the last rung. Every variant sees the same normals, masks and seeds.

Per variant and defect type it reports, with ``defectforge.metrics.realism.defect_stats``:
the pooled in-mask saturated share, mean in-mask grey level, contrast against the
ring around the mask, chroma, edge sharpness, and the intensity distance to the
real defects of the type; the same statistics of those real defects are the
reference. Writes a JSON and a markdown table, and one PNG grid per defect type
(rows: samples; columns: a real defect, then every variant, mask outlined in red
just outside the mask).

    python experiments/realism-ablation/realism_ablation.py --split /tmp/mt/split.parquet \\
        --checkpoints /tmp/mt/models/finetune-before-xxx --category magnetic-tile \\
        --defects blowhole,crack,break --n 8 --steps 20 --name magnetic-tile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from defectforge.data.codec import read_image, read_mask
from defectforge.pipeline.generate import plan_samples
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.masks.target import sample_target_mask
from defectforge.methods.blended import BlendedConfig, Blended
from defectforge.methods.inversion import InversionConfig, Inversion
from defectforge.metrics.realism import defect_stats, intensity_distance
from defectforge.diffusion.sampling import category_checkpoints as checkpoints

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results

OLD = {"clip_x0": False, "gray_steps": False, "feather": 0.0}  # the sampler before issue 8

# (name, method, config overrides): cumulative, one fix per rung
VARIANTS = [
    ("inv:baseline", "inversion", {**OLD, "paste": "crop", "guidance": 2.0}),
    ("inv:+clip_x0", "inversion", {**OLD, "clip_x0": True, "paste": "crop", "guidance": 2.0}),
    ("inv:+gray_steps", "inversion", {**OLD, "clip_x0": True, "gray_steps": True, "paste": "crop", "guidance": 2.0}),
    ("inv:+feather", "inversion", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "paste": "crop", "guidance": 2.0}),
    ("inv:+paste_mask", "inversion", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "paste": "mask", "guidance": 2.0}),
    ("inv:+noised_bg", "inversion", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "paste": "mask", "guidance": 2.0, "defect_background": "noised"}),
    ("inv:w=1.5", "inversion", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "paste": "mask", "guidance": 1.5}),
    ("inv:w=1", "inversion", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "paste": "mask", "guidance": 1.0}),
    ("bld:baseline", "blended", {**OLD, "guidance": 2.0}),
    ("bld:+clip_x0", "blended", {**OLD, "clip_x0": True, "guidance": 2.0}),
    ("bld:+gray_steps", "blended", {**OLD, "clip_x0": True, "gray_steps": True, "guidance": 2.0}),
    ("bld:+feather", "blended", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "guidance": 2.0}),
    ("bld:w=1.5", "blended", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "guidance": 1.5}),
    ("bld:w=1", "blended", {"clip_x0": True, "gray_steps": True, "feather": 1.5, "guidance": 1.0}),
]
STATS = ["saturated_share", "in_mask_mean", "in_mask_std", "contrast", "edge_sharpness", "chroma"]


def summarise(stats: list[dict]) -> dict:
    """Pooled saturated share (pixels over the whole set) and means of the other statistics."""
    out = {"n": len(stats)}
    mp = sum(s["mask_px"] for s in stats)
    out["saturated_share"] = float(sum(s["saturated_px"] for s in stats) / mp) if mp else float("nan")
    for k in STATS[1:]:
        v = np.array([s[k] for s in stats], float)
        out[k] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    c = np.array([s["contrast"] for s in stats], float)
    c = c[np.isfinite(c)]
    out["contrast_iqr"] = [float(np.percentile(c, 25)), float(np.percentile(c, 75))] if len(c) else None
    return out


def view(image: np.ndarray, mask: np.ndarray, size: int = 96) -> np.ndarray:
    """Square crop around the mask (2x its extent, at least 32 px), resized, mask outlined in red outside the mask."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    side = max(32, int(2 * max(ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)))
    side = min(side, *mask.shape)
    top = int(np.clip(cy - side // 2, 0, mask.shape[0] - side))
    left = int(np.clip(cx - side // 2, 0, mask.shape[1] - side))
    crop = image[top : top + side, left : left + side]
    m = mask[top : top + side, left : left + side]
    img = np.array(Image.fromarray(crop).resize((size, size), Image.NEAREST if side < size else Image.BILINEAR))
    mm = np.array(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    p = np.pad(mm, 1)
    dil = p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] | mm
    img[dil & ~mm] = (255, 0, 0)
    return img


def grid(rows: list[list[np.ndarray]], labels: list[str], path: Path, size: int = 96) -> None:
    pad, head = 4, 14
    w = len(labels) * (size + pad) + pad
    h = len(rows) * (size + pad) + pad + head
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lab in enumerate(labels):
        draw.text((pad + j * (size + pad), 1), lab[:16], fill=(0, 0, 0))
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (pad + j * (size + pad), head + pad + i * (size + pad)))
    canvas.save(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", required=True)
    ap.add_argument("--checkpoints", required=True, help="finetune output directory (checkpoints.json)")
    ap.add_argument("--category", default=None, help="default: every category of the split")
    ap.add_argument("--defects", default="", help="comma-separated defect types (default: all with a checkpoint)")
    ap.add_argument("--n", type=int, default=8, help="samples per defect type")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--name", default="sample")
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--grid-rows", type=int, default=4)
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    info = manifest_info(args.split)
    root = Path(info["dataset_root"])
    df = read_manifest(args.split).to_pandas()
    cats = [args.category] if args.category else sorted(df["category"].unique())
    variants = [v for v in VARIANTS if not args.variants or v[0] in args.variants.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"name": args.name, "split": str(args.split), "checkpoints": str(args.checkpoints), "n": args.n, "steps": args.steps,
              "variants": {v[0]: {"method": v[1], **v[2]} for v in variants}, "results": {}}
    t0 = time.time()
    for cat in cats:
        ck = checkpoints(args.checkpoints, cat)
        want = [d for d in args.defects.split(",") if d] or sorted(ck)
        specs = [s for s in plan_samples(df[df["category"] == cat], method="ablation", n_per_defect=args.n, seed=args.seed, params_sha256="ablation")
                 if s.defect_type in want]
        methods = {
            "inversion": Inversion.from_pretrained({d: ck[d] for d in want}, InversionConfig(steps=args.steps), device="cpu"),
            "blended": Blended.from_pretrained({d: ck[d] for d in want}, BlendedConfig(steps=args.steps), device="cpu"),
        }
        by_id = df.set_index("image_id")
        for defect in want:
            rows_def = df[(df["category"] == cat) & (df["defect_type"] == defect)]
            train_def = rows_def[rows_def["split"] == "train"]
            real = [(read_image(root / r.image_path), read_mask(root / r.mask_path)) for r in rows_def.itertuples()]
            real_stats = [defect_stats(i, m) for i, m in real if m.any()]
            train_masks = [read_mask(root / r.mask_path) for r in train_def.itertuples()]
            key = f"{cat}/{defect}"
            res = {"real": summarise(real_stats), "n_real": len(real_stats), "variants": {}}
            tiles = [[view(*real[i % len(real)])] for i in range(min(args.grid_rows, args.n))]
            my_specs = [s for s in specs if s.defect_type == defect]
            for name, meth, over in variants:
                method = methods[meth]
                base_cfg = method.config_class(steps=args.steps, device="cpu")
                method.config = method.config_class(**{**base_cfg.to_dict(), **over})
                stats, t1 = [], time.time()
                for k, spec in enumerate(my_specs):
                    normal = read_image(root / by_id.loc[spec.normal_id].image_path)
                    target, _ = sample_target_mask(train_masks, normal, np.random.default_rng(spec.seed))
                    r = method.generate(normal, target, defect, spec.seed)
                    stats.append(defect_stats(r.image, r.mask, reference=normal))
                    if k < len(tiles):
                        tiles[k].append(view(r.image, r.mask))
                summ = summarise(stats)
                summ["intensity_distance"] = intensity_distance(stats, real_stats)["distance"]
                summ["seconds"] = round(time.time() - t1, 1)
                res["variants"][name] = summ
                report["results"][key] = res  # partial results survive an interrupted run
                (out / f"realism-ablation-{args.name}.json").write_text(json.dumps(report, indent=2))
                print(f"{key} {name:18s} sat {summ['saturated_share']:.3f} mean {summ['in_mask_mean']:.1f} contrast {summ['contrast']:.1f} "
                      f"chroma {summ['chroma']:.1f} dist {summ['intensity_distance']:.2f} ({summ['seconds']} s)", flush=True)
            png = out / f"realism-ablation-{args.name}-{cat}-{defect}.png"
            grid(tiles, ["real"] + [v[0] for v in variants], png)
            res["grid"] = str(png.relative_to(ROOT)) if png.is_relative_to(ROOT) else str(png)
            report["results"][key] = res
    report["seconds"] = round(time.time() - t0, 1)
    (out / f"realism-ablation-{args.name}.json").write_text(json.dumps(report, indent=2))
    (out / f"realism-ablation-{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    lines = [f"### {report['name']}: {report['n']} samples per defect type, {report['steps']} DDIM steps", ""]
    lines.append("| defect | variant | saturated % | in-mask mean | in-mask std | contrast | chroma | edge | intensity dist. |")
    lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, res in report["results"].items():
        r = res["real"]
        iqr = r.get("contrast_iqr") or [float("nan")] * 2
        lines.append(f"| {key} | **real** (n={res['n_real']}) | {100 * r['saturated_share']:.1f} | {r['in_mask_mean']:.1f} | {r['in_mask_std']:.1f} | "
                     f"{r['contrast']:.1f} (IQR {iqr[0]:.1f}..{iqr[1]:.1f}) | {r['chroma']:.1f} | {r['edge_sharpness']:.1f} | - |")
        for name, s in res["variants"].items():
            lines.append(f"| {key} | {name} | {100 * s['saturated_share']:.1f} | {s['in_mask_mean']:.1f} | {s['in_mask_std']:.1f} | {s['contrast']:.1f} | "
                         f"{s['chroma']:.1f} | {s['edge_sharpness']:.1f} | {s['intensity_distance']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

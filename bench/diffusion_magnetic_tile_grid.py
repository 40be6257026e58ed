"""Generate Blowhole and Crack defects on Magnetic Tile normals with both methods and
write a PNG grid: normal crop, target mask, generated + refined mask per method,
and real defects.

    PYTHONPATH=src python bench/diffusion_magnetic_tile_grid.py MODEL_DIR docs/magnetic-tile-grid.png

MODEL_DIR holds ft-blowhole/ and ft-crack/ from diffusion_magnetic_tile_train.py.
Target masks are real masks of held-out defect images (the upper two thirds of the
sorted ids), moved onto defect-free MT_Free images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).parent))
from diffusion_magnetic_tile_train import load_class, split_defects  # noqa: E402

from defectforge.data.io import read_image, read_mask  # noqa: E402
from defectforge.masks.crop import crop_box  # noqa: E402
from defectforge.masks.refine import difference_mask, refine_mask  # noqa: E402
from defectforge.methods.blended import BlendedConfig, BlendedMethod  # noqa: E402
from defectforge.methods.inversion import InversionConfig, InversionMethod  # noqa: E402

TILE = 64
ZOOM = 3


def move_mask(mask: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    patch = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    ph, pw = min(patch.shape[0], shape[0]), min(patch.shape[1], shape[1])
    patch = patch[:ph, :pw]
    out = np.zeros(shape, bool)
    top = int(rng.integers(shape[0] // 4, max(shape[0] // 4 + 1, shape[0] - ph - shape[0] // 4)))
    left = int(rng.integers(shape[1] // 4, max(shape[1] // 4 + 1, shape[1] - pw - shape[1] // 4)))
    top, left = min(top, shape[0] - ph), min(left, shape[1] - pw)
    out[top : top + ph, left : left + pw] = patch
    return out


def tile(arr: np.ndarray, box) -> Image.Image:
    ys, xs = box.slices()
    a = arr[ys, xs]
    if a.dtype == bool:
        if a.shape != (TILE, TILE):  # thin cracks must survive the downsampling: any-pixel rule
            from defectforge.masks.crop import resize_float

            a = resize_float(a.astype(np.float32), (TILE, TILE)) > 0.15
        a = np.repeat((a.astype(np.uint8) * 255)[..., None], 3, axis=2)
    im = Image.fromarray(a).resize((TILE, TILE), Image.BILINEAR) if a.shape[:2] != (TILE, TILE) else Image.fromarray(a)
    return im.resize((TILE * ZOOM, TILE * ZOOM), Image.NEAREST)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--paste", default="crop")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    normals = load_class("Free")
    rows = {k: [] for k in ("normal crop", "target mask", "inversion", "inversion Eq.13", "inversion diff", "blended", "blended Eq.13",
                            "blended diff", "real defect")}
    timings = {"inversion": [], "blended": []}
    meta = []
    col = 0
    for name in ("Blowhole", "Crack"):
        ckpt = args.models / f"ft-{name.lower()}"
        inv = InversionMethod.from_pretrained(ckpt, InversionConfig(steps=args.steps, guidance=args.guidance, paste=args.paste), device="cpu")
        bld = BlendedMethod.from_pretrained(ckpt, BlendedConfig(steps=args.steps, guidance=args.guidance), device="cpu")
        train, held = split_defects(name)
        held = [p for p in held if 30 <= read_mask(p.with_suffix(".png")).sum() <= 1500]
        picks = [held[i] for i in np.linspace(0, len(held) - 1, args.per_class).astype(int)]
        reals = [train[i] for i in np.linspace(0, len(train) - 1, args.per_class).astype(int)]
        for k, src in enumerate(picks):
            normal_path = normals[int(rng.integers(len(normals)))]
            img = read_image(normal_path)
            mask = move_mask(read_mask(src.with_suffix(".png")), img.shape[:2], rng)
            box = crop_box(mask, TILE)
            rows["normal crop"].append(tile(img, box))
            rows["target mask"].append(tile(mask, box))
            for key, method in (("inversion", inv), ("blended", bld)):
                t0 = time.perf_counter()
                r = method.generate(img, mask, name.lower(), seed=col)
                timings[key].append(time.perf_counter() - t0)
                rows[key].append(tile(r.image, box))
                refined = refine_mask(r.attention, r.mask)
                rows[f"{key} Eq.13"].append(tile(refined, box))
                diff = difference_mask(img, r.image, r.mask)
                rows[f"{key} diff"].append(tile(diff, box))
                meta.append({"defect": name, "method": key, "normal": normal_path.name, "mask_from": src.name,
                             "target_px": int(mask.sum()), "refined_px": int(refined.sum()), "difference_px": int(diff.sum()),
                             "attention_max": float(r.attention.max()), "seconds": round(timings[key][-1], 2)})
            real_img, real_mask = read_image(reals[k]), read_mask(reals[k].with_suffix(".png"))
            rows["real defect"].append(tile(real_img, crop_box(real_mask, TILE)))
            col += 1
            print(meta[-2], meta[-1], flush=True)
    label_w = 150
    size = TILE * ZOOM
    grid = Image.new("RGB", (label_w + col * (size + 4), len(rows) * (size + 4) + 24), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w, 4), f"Blowhole (cols 1-{args.per_class})    Crack (cols {args.per_class + 1}-{2 * args.per_class})    "
              f"tiny profile, {args.steps} DDIM steps, w_d={args.guidance}", fill="black")
    for r, (label, tiles) in enumerate(rows.items()):
        y = 24 + r * (size + 4)
        draw.text((4, y + size // 2), label, fill="black")
        for c, t in enumerate(tiles):
            grid.paste(t, (label_w + c * (size + 4), y))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    summary = {k: {"mean_seconds_per_sample": round(float(np.mean(v)), 2), "n": len(v)} for k, v in timings.items()}
    (args.out.with_suffix(".json")).write_text(json.dumps({"timings": summary, "samples": meta}, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

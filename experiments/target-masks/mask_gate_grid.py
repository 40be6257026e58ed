"""What the mask models' shape gate keeps and what it redraws, by eye (Magnetic Tile).

    .venv/bin/python experiments/target-masks/mask_gate_grid.py --models /tmp/mt/models/finetune-genmask/magnetic-tile --draws 60

Per defect type: ``draws`` single draws of the type's mask model with the gate off, split by
:func:`defectforge.methods.anomalydiffusion.mask_model.in_shape_range` against the range of the type's real
training masks (the model's stored ``shape_range``), next to the real training masks. Writes
experiments/target-masks/generated-masks-gate.png and prints the counts and the refused draws' area and elongation.
A folder holds ``<type>/mask_model.json`` or ``<type>/mask_model/mask_model.json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from defectforge.data.codec import read_image, read_mask
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR, in_shape_range, load_mask_model, shape_range
from defectforge.metrics.mask_shapes import elongation

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="/tmp/mt/split.parquet")
    ap.add_argument("--models", required=True, help="folder with one mask model per defect type")
    ap.add_argument("--defects", nargs="+", default=["crack", "blowhole", "break"])
    ap.add_argument("--draws", type=int, default=60)
    ap.add_argument("--out", default=str(HERE / "generated-masks-gate.png"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    sp = read_manifest(a.split).to_pandas()
    src = Path(manifest_info(a.split)["dataset_root"])
    goods = sp[(sp.split == "train") & (sp.defect_type == "good")].sort_values("image_id")
    rows = []
    for d in a.defects:
        real = [read_mask(src / r.mask_path) for r in sp[(sp.split == "train") & (sp.defect_type == d)].itertuples()]
        folder = Path(a.models) / d
        model = load_mask_model(folder / MASK_MODEL_DIR if (folder / MASK_MODEL_DIR).is_dir() else folder)
        # the range the gate uses in generate; a model saved before the gate existed gets it from the real masks
        rng = model.meta.get("shape_range") or shape_range([m for m in real if m.any()])
        kept, refused = [], []
        for j in range(a.draws):
            normal = read_image(src / goods.iloc[j % len(goods)].image_path)
            m = model.sample(normal.shape[:2], j, steps=30, tries=1, gate=False)
            if m is not None:
                (kept if in_shape_range(m, rng) else refused).append(m)
        print(f"{d}: {len(kept)} kept, {len(refused)} refused of {a.draws} draws; range {rng}; refused (log10 area, elongation): "
              f"{[(round(float(np.log10(m.mean())), 2), round(elongation(m), 2)) for m in refused]}")
        rows += [(f"{d} kept", kept), (f"{d} refused", refused), (f"{d} real (train)", real)]
    side, label = 72, 130
    canvas = Image.new("L", (label + 8 * (side + 4), len(rows) * (side + 4)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, masks) in enumerate(rows):
        draw.text((4, r * (side + 4) + side // 2 - 6), name, fill=0)
        for c, m in enumerate(masks[:8]):
            canvas.paste(Image.fromarray((m * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR), (label + c * (side + 4), r * (side + 4)))
    canvas.save(a.out)
    print(a.out)


if __name__ == "__main__":
    main()

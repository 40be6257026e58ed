"""Train the tiny profile on Magnetic Tile: pretrain on MT_Free crops, then finetune
Blowhole and Crack on the lowest third of their sorted ids (AnomalyDiffusion's split).

    PYTHONPATH=src python bench/diffusion_magnetic_tile_train.py OUT_DIR [--pretrain-steps N] [--finetune-steps N]

Writes OUT_DIR/tiny, OUT_DIR/ft-<defect>, OUT_DIR/train_metrics.json.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from defectforge.data.io import read_image, read_mask
from defectforge.diffusion import finetune, pretrain

DATA = Path("/work/shared/data/magnetic-tile")


def _id(p: Path) -> int:
    return int(re.search(r"(\d+)$", p.stem).group(1))


def load_class(name: str) -> list[Path]:
    return sorted((DATA / f"MT_{name}" / "Imgs").glob("*.jpg"), key=_id)


def split_defects(name: str) -> tuple[list[Path], list[Path]]:
    """Lowest third of the sorted ids for training, the rest held out."""
    files = load_class(name)
    n = len(files) // 3
    return files[:n], files[n:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--pretrain-steps", type=int, default=900)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--defects", nargs="+", default=["Blowhole", "Crack"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {"backbone": "defectforge tiny profile (pixel-space UNet2DConditionModel, trained from scratch here)"}
    normals = [read_image(p) for p in load_class("Free")]
    t0 = time.time()
    if not (args.out / "tiny" / "model_index.json").is_file():
        metrics["pretrain"] = pretrain(normals, args.out / "tiny", steps=args.pretrain_steps, batch_size=args.batch_size, lr=6e-4, seed=0)
        print("pretrain", metrics["pretrain"], flush=True)
    for name in args.defects:
        train, _ = split_defects(name)
        pairs = [(read_image(p), read_mask(p.with_suffix(".png"))) for p in train]
        pairs = [(i, m) for i, m in pairs if m.any()]
        metrics[f"finetune_{name}"] = finetune(
            args.out / "tiny", pairs, name.lower(), args.out / f"ft-{name.lower()}", normals=normals[:200],
            mode="unet", steps=args.finetune_steps, batch_size=args.batch_size, lr=3e-4, seed=0,
        )
        print("finetune", name, metrics[f"finetune_{name}"], flush=True)
    metrics["total_seconds"] = round(time.time() - t0, 1)
    (args.out / "train_metrics.json").write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()

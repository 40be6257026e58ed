"""Add AnomalyDiffusion mask models (Eq. 9) to a copy of an existing Magnetic Tile fine-tune.

    .venv/bin/python experiments/target-masks/mt_mask_models.py /tmp/mt/models/finetune-after-3b2c52bdbbf7 /tmp/mt/models/finetune-genmask

Copies the finetune folder SRC to DST (once), then fits one mask model per defect type
on the type's real *training* masks of the library's split (non-empty ones) into
``DST/<category>/<type>/mask_model`` - what the finetune stage does with
``finetune.mask_model: diffusion`` - so a benchmark can compare ``generate.target_placement:
generated`` with the other placements on the *same* image models (bench_magnetic_tile.py
--finetune-dir DST --placement generated). Types that already have a model are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from defectforge.data.codec import read_mask  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR  # noqa: E402
from defectforge.methods.anomalydiffusion.mask_training import fit_mask_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path, help="a finetune stage output (checkpoints.json + one folder per type)")
    ap.add_argument("dst", type=Path)
    ap.add_argument("--split", default="/tmp/mt/split.parquet")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--resolution", type=int, default=64)
    a = ap.parse_args()
    if not (a.src / "checkpoints.json").is_file():
        raise SystemExit(f"{a.src}: no checkpoints.json (not a finetune stage output)")
    if not a.dst.exists():
        shutil.copytree(a.src, a.dst)
    sp = read_manifest(a.split).to_pandas()
    root = Path(manifest_info(a.split)["dataset_root"])
    for key in json.loads((a.dst / "checkpoints.json").read_text()):
        category, defect = key.split("/", 1)
        out = a.dst / category / defect / MASK_MODEL_DIR
        if (out / "mask_model.json").exists():
            continue
        rows = sp[(sp.split == "train") & (sp.category == category) & (sp.defect_type == defect)]
        masks = [m for m in (read_mask(root / r.mask_path) for r in rows.itertuples()) if m.any()]
        t0 = time.perf_counter()
        metrics = fit_mask_model(None, masks, out, kind="diffusion", resolution=a.resolution, steps=a.steps, batch_size=8, seed=0)
        print(json.dumps({key: metrics, "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()

"""Stage ``pretrain``: the base model the finetune stage starts from.

Tiny profile: trains the built-in pixel-space UNet from scratch on random crops of the
*training* defect-free images of every category (as DFMGAN pretrains on normals).
Pretrained profile: nothing to train; the stage records which diffusers model
(directory or hub id) the finetune stage starts from, so ``dvc repro`` reruns
finetuning when it changes. Without a diffusion method in ``generate.methods`` it
writes only a marker saying so.

Everything written is a function of the inputs and params (no wall-clock times: the
training time goes to the log), so a rerun, or a run on another machine with the same
wheels and CPU instruction set, gives the same bytes (``docs/reproducibility.md``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from defectforge.data.codec import read_image
from defectforge.data.files import atomic_dir, atomic_write_text
from defectforge.errors import DataError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.params.pretrain import PretrainParams
from defectforge.pipeline.entry import pin_cpu_isa

BASE_POINTER = "base.json"


def train_rows(split: str | os.PathLike):
    root = Path(manifest_info(split)["dataset_root"])
    df = read_manifest(split).to_pandas()
    return root, df[df["split"] == "train"]


def run(p: PretrainParams, split: str | os.PathLike, out_dir: str | os.PathLike, *, needed: list[str] | None = None, progress: bool = True) -> Path:
    """Train (tiny) or record (pretrained) the base model; ``needed=[]`` (no diffusion
    method asked for) writes only a marker saying so."""
    pin_cpu_isa()  # the same kernels as the DVC stage, when nothing has computed yet
    with atomic_dir(out_dir, "pretrain folder") as tmp:
        _build(p, split, tmp, needed, progress)
    return Path(out_dir)


def _build(p: PretrainParams, split, tmp: Path, needed: list[str] | None, progress: bool) -> None:
    if needed is not None and not needed:
        atomic_write_text(tmp / BASE_POINTER, json.dumps({"profile": "none", "reason": "no diffusion method in generate.methods"}) + "\n")
        pd.DataFrame({"step": [], "loss": []}).to_csv(tmp / "training_curve.csv", index=False)
    elif p.profile == "pretrained":
        atomic_write_text(tmp / BASE_POINTER, json.dumps({"profile": "pretrained", "base": p.base}, indent=2) + "\n")
        pd.DataFrame({"step": [0], "loss": [float("nan")]}).to_csv(tmp / "training_curve.csv", index=False)
    else:
        from defectforge.diffusion import pretrain
        from defectforge.diffusion.training import file_metrics

        root, train = train_rows(split)
        good = train[train["defect_type"] == "good"]
        if good.empty:
            raise DataError(f"{split}: no defect-free training images to pretrain the tiny model on")
        images = [read_image(root / r.image_path) for r in good.itertuples()]
        metrics = pretrain(images, tmp / "model", steps=p.steps, batch_size=p.batch_size, lr=p.lr, seed=p.seed, device=p.device, progress=progress, threads=p.threads)
        shutil.copy2(tmp / "model" / "training_curve.csv", tmp / "training_curve.csv")
        atomic_write_text(tmp / BASE_POINTER, json.dumps({"profile": "tiny", "base": "model", "metrics": file_metrics(metrics)}, indent=2, default=str) + "\n")


def base_model(pretrain_dir: str | os.PathLike) -> str:
    """The directory or hub id the finetune stage starts from."""
    info = json.loads((Path(pretrain_dir) / BASE_POINTER).read_text())
    return str(Path(pretrain_dir) / info["base"]) if info["profile"] == "tiny" else info["base"]

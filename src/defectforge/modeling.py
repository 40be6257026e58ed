"""The pretrain and finetune stages: base model, then one checkpoint per defect type.

``pretrain`` — tiny profile: trains the built-in pixel-space UNet from scratch on
random crops of the *training* defect-free images of every category (as DFMGAN
pretrains on normals). Pretrained profile: nothing to train; the stage records which
diffusers model (directory or hub id) the finetune stage starts from, so ``dvc repro``
reruns finetuning when it changes.

``finetune`` — for every (category, defect type) of the training split, the
DDIM-inversion paper's disentangled training (masked matching loss + background
regulariser, Eq. 5-7; masked cross-attention, Eq. 10-11) from the base model, into
``<out>/<category>/<defect type>/`` (safetensors), and one training curve for DVC plots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

from defectforge.data.io import atomic_write_text, read_image, read_mask
from defectforge.errors import DataError
from defectforge.manifest.io import manifest_info, read_manifest
from defectforge.params import FinetuneParams, PretrainParams

BASE_POINTER = "base.json"


def _train_rows(split: str | os.PathLike):
    root = Path(manifest_info(split)["dataset_root"])
    df = read_manifest(split).to_pandas()
    return root, df[df["split"] == "train"]


def run_pretrain(p: PretrainParams, split: str | os.PathLike, out_dir: str | os.PathLike, *, needed: list[str] | None = None, progress: bool = True) -> Path:
    """Train (tiny) or record (pretrained) the base model; ``needed=[]`` (no diffusion
    method asked for) writes only a marker saying so."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if needed is not None and not needed:
        atomic_write_text(tmp / BASE_POINTER, json.dumps({"profile": "none", "reason": "no diffusion method in generate.methods"}) + "\n")
        pd.DataFrame({"step": [], "loss": []}).to_csv(tmp / "training_curve.csv", index=False)
    elif p.profile == "pretrained":
        atomic_write_text(tmp / BASE_POINTER, json.dumps({"profile": "pretrained", "base": p.base}, indent=2) + "\n")
        pd.DataFrame({"step": [0], "loss": [float("nan")]}).to_csv(tmp / "training_curve.csv", index=False)
    else:
        from defectforge.diffusion import pretrain

        root, train = _train_rows(split)
        good = train[train["defect_type"] == "good"]
        if good.empty:
            raise DataError(f"{split}: no defect-free training images to pretrain the tiny model on")
        images = [read_image(root / r.image_path) for r in good.itertuples()]
        metrics = pretrain(images, tmp / "model", steps=p.steps, batch_size=p.batch_size, lr=p.lr, seed=p.seed, device=p.device, progress=progress)
        shutil.copy2(tmp / "model" / "training_curve.csv", tmp / "training_curve.csv")
        atomic_write_text(tmp / BASE_POINTER, json.dumps({"profile": "tiny", "base": "model", "metrics": metrics}, indent=2, default=str) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def base_model(pretrain_dir: str | os.PathLike) -> str:
    """The directory or hub id the finetune stage starts from."""
    info = json.loads((Path(pretrain_dir) / BASE_POINTER).read_text())
    return str(Path(pretrain_dir) / info["base"]) if info["profile"] == "tiny" else info["base"]


def run_finetune(
    p: FinetuneParams, split: str | os.PathLike, pretrain_dir: str | os.PathLike, out_dir: str | os.PathLike, *, needed: list[str] | None = None, progress: bool = True
) -> Path:
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if needed is not None and not needed:
        atomic_write_text(tmp / "checkpoints.json", "{}\n")
        pd.DataFrame({"defect": [], "step": [], "loss": []}).to_csv(tmp / "training_curve.csv", index=False)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        return out_dir
    from defectforge.diffusion import CURVE_FILE, finetune

    base = base_model(pretrain_dir)
    root, train = _train_rows(split)
    curves, index = [], {}
    groups = train[train["defect_type"] != "good"].groupby(["category", "defect_type"], sort=True)
    for (category, defect), rows in groups:
        defects = [(read_image(root / r.image_path), read_mask(root / r.mask_path)) for r in rows.itertuples()]
        goods = train[(train["category"] == category) & (train["defect_type"] == "good")]
        normals = [read_image(root / r.image_path) for r in goods.itertuples()]
        target = tmp / category / defect
        if progress:
            print(f"finetune {category}/{defect}: {len(defects)} real defects, {len(normals)} normals, {p.steps} steps", flush=True)
        metrics = finetune(
            base, defects, defect, target, normals=normals, mode=p.mode, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
            token_lr=p.token_lr, lora_rank=p.lora_rank, prior_fraction=p.prior_fraction, loss_norm=p.loss_norm,
            attention_loss=p.attention_loss, attention_rows=p.attention_rows, seed=p.seed, device=p.device, progress=progress,
        )
        index[f"{category}/{defect}"] = {"path": f"{category}/{defect}", "metrics": metrics}
        c = pd.read_csv(target / CURVE_FILE)
        c.insert(0, "defect", f"{category}/{defect}")
        curves.append(c)
    if not index:
        raise DataError(f"{split}: no defect types in the training split to fine-tune on")
    pd.concat(curves).to_csv(tmp / "training_curve.csv", index=False)
    atomic_write_text(tmp / "checkpoints.json", json.dumps(index, indent=2, sort_keys=True, default=str) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


def checkpoints(finetune_dir: str | os.PathLike, category: str) -> dict[str, str]:
    """{defect type: checkpoint directory} of one category."""
    index = json.loads((Path(finetune_dir) / "checkpoints.json").read_text())
    return {k.split("/", 1)[1]: str(Path(finetune_dir) / v["path"]) for k, v in index.items() if k.split("/", 1)[0] == category}

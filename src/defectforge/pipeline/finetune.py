"""Stage ``finetune``: one checkpoint per (category, defect type).

For every (category, defect type) of the training split, the DDIM-inversion paper's
disentangled training (masked matching loss + background regulariser, Eq. 5-7;
masked cross-attention, Eq. 10-11; the attention loss that makes Eq. 13 work) from
the base model (and, as asked, AnomalyDiffusion's anomaly embedding and mask model), into ``<out>/<category>/<defect type>/`` (safetensors), the index
``checkpoints.json`` (read by :func:`defectforge.diffusion.sampling.category_checkpoints`)
and one training curve for DVC plots. No wall-clock values in any of them (the
training time goes to the log): see ``docs/reproducibility.md``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from defectforge.data.codec import read_image, read_mask
from defectforge.data.files import atomic_dir, atomic_write_text
from defectforge.diffusion.sampling import CHECKPOINT_INDEX
from defectforge.errors import DataError
from defectforge.params.finetune import FinetuneParams
from defectforge.pipeline.entry import pin_cpu_isa
from defectforge.pipeline.parallel import spawn_map
from defectforge.pipeline.pretrain import base_model, train_rows


def run(
    p: FinetuneParams, split: str | os.PathLike, pretrain_dir: str | os.PathLike, out_dir: str | os.PathLike, *, needed: list[str] | None = None, progress: bool = True
) -> Path:
    """Fine-tune the base model of ``pretrain_dir`` per defect type into ``out_dir``."""
    pin_cpu_isa()  # the same kernels as the DVC stage, when nothing has computed yet
    with atomic_dir(out_dir, "finetune folder") as tmp:
        if needed is not None and not needed:
            atomic_write_text(tmp / CHECKPOINT_INDEX, "{}\n")
            pd.DataFrame({"defect": [], "step": [], "loss": []}).to_csv(tmp / "training_curve.csv", index=False)
        else:
            _train_all(p, split, pretrain_dir, tmp, progress)
    return Path(out_dir)


def _train_all(p: FinetuneParams, split, pretrain_dir, tmp: Path, progress: bool) -> None:
    from defectforge.diffusion.training import CURVE_FILE

    base = base_model(pretrain_dir)
    root, train = train_rows(split)
    jobs = []
    groups = train[train["defect_type"] != "good"].groupby(["category", "defect_type"], sort=True)
    for (category, defect), rows in groups:
        goods = train[(train["category"] == category) & (train["defect_type"] == "good")]
        jobs.append((category, defect, [(r.image_path, r.mask_path) for r in rows.itertuples()], [r.image_path for r in goods.itertuples()]))
    if not jobs:
        raise DataError(f"{split}: no defect types in the training split to fine-tune on")
    workers = min(p.workers, len(jobs))
    if progress and workers > 1:
        print(f"finetune: {len(jobs)} defect types on {workers} processes", flush=True)
    bars = progress and workers == 1  # progress bars in-process only; each worker prints one line per type
    # one process per defect type at a time (pipeline/parallel.py): the bytes of workers = 1
    results = list(spawn_map(_train_one, [(p, base, root, tmp, *job, bars, progress) for job in jobs], workers, len(jobs)))
    curves, index = [], {}
    for (category, defect, _, _), metrics in zip(jobs, results):
        index[f"{category}/{defect}"] = {"path": f"{category}/{defect}", "metrics": metrics}
        c = pd.read_csv(tmp / category / defect / CURVE_FILE)
        c.insert(0, "defect", f"{category}/{defect}")
        curves.append(c)
    pd.concat(curves).to_csv(tmp / "training_curve.csv", index=False)
    atomic_write_text(tmp / CHECKPOINT_INDEX, json.dumps(index, indent=2, sort_keys=True, default=str) + "\n")


def _train_one(p: FinetuneParams, base, root: Path, tmp: Path, category: str, defect: str, defect_paths: list, normal_paths: list,
               progress: bool, announce: bool) -> dict:
    """Fine-tune one (category, defect type) into ``tmp/<category>/<defect>``; its file metrics."""
    from defectforge.diffusion import finetune
    from defectforge.diffusion.training import file_metrics
    from defectforge.methods.defectdiffu.training import defectdiffu_hooks

    pin_cpu_isa()  # a spawned worker: the same kernels as the stage's own process
    defects = [(read_image(root / i), read_mask(root / m)) for i, m in defect_paths]
    normals = [read_image(root / i) for i in normal_paths]
    target = tmp / category / defect
    if announce:
        print(f"finetune {category}/{defect}: {len(defects)} real defects, {len(normals)} normals, {p.steps} steps", flush=True)
    metrics = finetune(
        base, defects, defect, target, normals=normals, mode=p.mode, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
        token_lr=p.token_lr, lora_rank=p.lora_rank, prior_fraction=p.prior_fraction, loss_norm=p.loss_norm,
        attention_loss=p.attention_loss, attention_rows=p.attention_rows,
        hooks=defectdiffu_hooks(cond_dropout_product=p.cond_dropout_product, cond_dropout_defect=p.cond_dropout_defect, aal=p.aal,
                                aal_alpha=p.aal_alpha, tdia=p.tdia, mask_module=p.mask_module, mask_module_lr=p.mask_module_lr),
        trimap_control=p.trimap_control,
        trimap_control_steps=p.trimap_control_steps or None, seed=p.seed, device=p.device, progress=progress,
        category=category, precision=p.precision, gradient_checkpointing=p.gradient_checkpointing, optimizer=p.optimizer,
    )
    if p.anomaly_embedding:  # AnomalyDiffusion: masked textual inversion (Eq. 5-6) of e_a and E on the frozen base
        from defectforge.methods.anomalydiffusion.embedding import EMBEDDING_DIR
        from defectforge.methods.anomalydiffusion.training import fit_anomaly_embedding

        metrics["anomaly_embedding"] = fit_anomaly_embedding(
            base, defects, defect, target / EMBEDDING_DIR, device=p.device, anomaly_tokens=p.anomaly_tokens,
            spatial_tokens=p.spatial_tokens, steps=p.anomaly_steps, lr=p.anomaly_lr, batch_size=p.batch_size, seed=p.seed,
        )
    if p.mask_model != "none":  # AnomalyDiffusion mask generation: Eq. 9's model of where and what shape the masks are
        from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR
        from defectforge.methods.anomalydiffusion.mask_training import fit_mask_model

        if announce:
            print(f"finetune {category}/{defect}: mask model ({p.mask_model}), {p.mask_model_steps} steps", flush=True)
        metrics["mask_model"] = fit_mask_model(
            base, [m for _, m in defects], target / MASK_MODEL_DIR, kind=p.mask_model, device=p.device, resolution=p.mask_model_resolution,
            tokens=p.mask_tokens, steps=p.mask_model_steps, batch_size=p.batch_size, flip=p.mask_model_flip, downsample=p.mask_model_downsample, seed=p.seed, progress=progress,
        )
    return file_metrics(metrics)

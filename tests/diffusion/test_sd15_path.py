"""The pretrained path at Stable Diffusion 1.5 size (random weights) on CPU, stage by stage:
finetune (LoRA, attention loss, DefectDiffu's condition dropout, AnomalyDiffusion's embedding),
generate (every diffusion method, attention captured), refine (Eq. 13) and quality.

The nightly test runs at 256 px (the UNet's ``sample_size`` 32 in a view of the 512 px directory:
the weights do not depend on it) with 2 training steps and 3 DDIM steps: 7 to 9.5 minutes on one
thread (2 cores at load 2-6), peak RSS 8.2-8.3 GB; it reuses a built directory at $DEFECTFORGE_SD15_DIR
(default /tmp/sd15-bench/model) or builds one (4.3 GB, about 25 s). Full-UNet fine-tuning is not
run: fp32 AdamW holds weights + gradients + two moments = 4 x 859.52 M x 4 B = 13.75 GB (12.8 GiB)
before the text encoder and VAE (0.83 GB) and the activations (about 2 GiB at 256 px, measured
with LoRA), over the 12 GiB this machine allows (docs/gpu-memory-plan.md: the options on GPUs).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

SD15_CACHE = Path(os.environ.get("DEFECTFORGE_SD15_DIR", "/tmp/sd15-bench/model"))  # a built fp32 text-to-image dir, reused read-only
DIFFUSION = ["inversion", "blended", "defectdiffu", "anomalydiffusion"]


def view_at(model: Path, out: Path, sample_size: int) -> Path:
    """A directory that reads ``model``'s weights (symlinks) with the UNet's ``sample_size`` set,
    so the library's resolution (sample_size x 8) is another one; nothing is copied."""
    out.mkdir(parents=True)
    for item in model.iterdir():
        if item.is_dir():
            (out / item.name).mkdir()
            for f in item.iterdir():
                (out / item.name / f.name).symlink_to(f.resolve())
        else:
            (out / item.name).symlink_to(item.resolve())
    cfg = json.loads((model / "unet" / "config.json").read_text())
    cfg["sample_size"] = sample_size
    (out / "unet" / "config.json").unlink()
    (out / "unet" / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def sd15_model(tmp: Path) -> tuple[Path, bool]:
    """The cached full-size directory when it loads, else one built under ``tmp`` (returned: built?)."""
    if (SD15_CACHE / "unet" / "diffusion_pytorch_model.safetensors").is_file() and (SD15_CACHE / "model_index.json").is_file():
        return SD15_CACHE, False
    from defectforge.diffusion.models import build_sd15_model

    return build_sd15_model(tmp / "sd15", seed=0), True


def one_type_sample(root: Path) -> Path:
    """The built-in sample reduced to one category and one defect type (one fine-tune)."""
    from defectforge.data.sample import make_sample

    make_sample(root, seed=0, size=96, n_train_good=3, n_test_good=2, n_defect=6)
    shutil.rmtree(root / "gravel")
    for part in ("test", "ground_truth"):
        shutil.rmtree(root / "brick" / part / "hole")
    return root


def stage_params(model_dir: Path):
    from defectforge.params.finetune import FinetuneParams
    from defectforge.params.generate import GenerateParams
    from defectforge.params.pretrain import PretrainParams
    from defectforge.params.quality import QualityParams
    from defectforge.params.refine import RefineParams

    pre = PretrainParams(profile="pretrained", base=str(model_dir), device="cpu")
    fin = FinetuneParams(mode="lora", steps=2, batch_size=1, attention_loss=1.0, cond_dropout_product=0.2, cond_dropout_defect=0.2,
                         anomaly_embedding=True, anomaly_steps=2, device="cpu")
    common = {"steps": 3, "device": "cpu"}
    gen = GenerateParams(
        methods=DIFFUSION, n_per_defect=2, shard_size=2,
        inversion={**common}, blended={**common, "adapt_steps": 2}, defectdiffu={**common, "attention_fraction": 0.5},
        anomalydiffusion={**common},
    )
    # random weights make noise: the set gates (saturation, colour drift, pass rate) would rightly fail, so they are off
    off = {"min_pass_rate": None, "saturated_samples_max": None, "colour_drift_samples_max": None}
    return pre, fin, gen, RefineParams(), QualityParams(set_gates=off)


STAGES = ("data", "pretrain", "finetune", "generate", "refine", "quality")


def run_stage(name: str, work: Path, model_dir: Path) -> Path:
    """One stage of ingest + split -> pretrain (pointer) -> finetune -> generate -> refine -> quality,
    reading the earlier stages' outputs from their fixed places under ``work``."""
    from defectforge.params.data import DataParams
    from defectforge.params.split import SplitParams
    from defectforge.pipeline import finetune, generate, ingest, pretrain, quality, refine, split

    pre, fin, gen, ref, qual = stage_params(model_dir)
    sp = work / "split.parquet"
    if name == "data":
        root = one_type_sample(work / "sample")
        source = ingest.run(DataParams(layout="mvtec", root=str(root)), work / "source.parquet", progress=False)
        return split.run(SplitParams(), source, sp)
    if name == "pretrain":
        return pretrain.run(pre, sp, work / "pretrain", needed=gen.model_needs(), progress=False)
    if name == "finetune":
        return finetune.run(fin, sp, work / "pretrain", work / "finetune", needed=gen.model_needs(), progress=False)
    if name == "generate":
        return generate.run(gen, sp, work / "generated", checkpoints=work / "finetune", progress=False)
    if name == "refine":
        return refine.run(ref, sp, work / "generated", work / "refined")
    if name == "quality":
        quality.run(qual, sp, work / "refined" / "manifest.parquet", work / "quality", progress=False)
        return work / "quality"
    raise ValueError(name)


def run_stages(work: Path, model_dir: Path) -> dict:
    return {name: run_stage(name, work, model_dir) for name in STAGES}


def check_outputs(work: Path) -> None:
    """What each stage under ``work`` must have written (also run by bench/sd15_end_to_end.py)."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from defectforge.manifest.io import read_manifest

    ft = work / "finetune" / "brick" / "crack"
    meta = json.loads((ft / "defectforge_finetune.json").read_text())
    assert meta["mode"] == "lora" and meta["profile"] == "pretrained"
    m = json.loads((work / "finetune" / "checkpoints.json").read_text())["brick/crack"]["metrics"]
    assert m["attention_loss"] == 1.0 and m["cond_dropout_product"] == 0.2 and m["anomaly_embedding"]["steps"] == 2
    assert (ft / "lora" / "pytorch_lora_weights.safetensors").is_file() and (ft / "anomaly_embedding").is_dir()
    curve = pd.read_csv(ft / "training_curve.csv")
    assert curve["step"].tolist() == [2] and curve["attention"].gt(0).all() and curve.notna().all().all(), curve  # logged at the last step
    for name in DIFFUSION:
        rows = read_manifest(work / "generated" / name / "manifest").to_pandas()
        assert len(rows) == 2 and (rows["width"] == 96).all(), (name, len(rows))  # pasted back into the 96 px source
        saved = rows["attention_path"].notna() & rows["attention_path"].astype(str).ne("")
        # Eq. 13's maps (inversion, blended) and DefectDiffu's mask attention are captured; AnomalyDiffusion keeps its mask
        assert saved.all() if name != "anomalydiffusion" else not saved.any(), (name, rows["attention_path"].tolist())
        for r in rows[saved].itertuples():  # the defect tokens' share, m' * A_def: it varies inside the mask and is larger there
            att = np.asarray(Image.open(work / "generated" / r.attention_path), dtype=float)
            inside = np.asarray(Image.open(work / "generated" / r.raw_mask_path)) > 0
            assert np.unique(att[inside]).size > 1 and att[inside].mean() > att[~inside].mean(), (name, r.attention_path)
    refined = read_manifest(work / "refined" / "manifest.parquet").to_pandas()
    assert len(refined) == 8 and set(refined["method"]) == set(DIFFUSION)
    src = refined.groupby("method")["mask_source"].agg(set)
    assert src["anomalydiffusion"] == {"raw"} and all("raw" not in src[m] for m in DIFFUSION[:3]), src
    assert (refined["mask_area"] > 0).all() and (refined["mask_area"] <= refined["raw_mask_area"]).all()  # inside the target mask
    details = json.loads((work / "quality" / "details.json").read_text())
    assert sorted(details["sets"]) == [f"brick/crack/{m}" for m in sorted(DIFFUSION)] and details["samples"] == 8
    assert all(e["n_fake"] == 2 and e["fid"] is not None for e in details["sets"].values())


@pytest.mark.slow
@pytest.mark.nightly
def test_sd15_pretrained_path_end_to_end(tmp_path):
    torch.set_num_threads(1)
    full, built = sd15_model(tmp_path)
    try:
        run_stages(tmp_path, view_at(full, tmp_path / "sd15-256", 32))
        check_outputs(tmp_path)
    finally:
        if built:
            shutil.rmtree(full, ignore_errors=True)


# ------------------------------------------------------------------ fixes found at full size, tested at tiny size
def test_decoder_adaptation_copies_no_encoder(tiny_latent_dir):
    """Blended's online decoder adaptation works on a copy of the decoding half only: the SD 1.5
    encoder (34.2 M parameters) is not duplicated per sample, the shared autoencoder keeps its
    encoder and weights, and the adapted copy decodes (and moved its decoder)."""
    from defectforge.diffusion import load_pipeline_components
    from defectforge.methods.blended import adapt_decoder

    comps = load_pipeline_components(str(tiny_latent_dir), device="cpu")
    shared = comps.autoencoder
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=g) * 2 - 1, size=16, mode="bilinear")
    z = comps.encode(x).detach() + 0.3 * torch.randn(1, 4, 8, 8, generator=g)
    d = torch.zeros(1, 1, 16, 16)
    d[..., 4:10, 4:10] = 1
    ae, _ = adapt_decoder(comps, z, x, d, steps=2, lr=1e-3)
    assert ae.encoder is None and not any(k.startswith("encoder.") for k in ae.state_dict())
    assert isinstance(shared.encoder, torch.nn.Module) and comps.autoencoder is shared
    after = shared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(ae.decoder.parameters(), shared.decoder.parameters()))
    assert comps.decode(z, decoder=ae).shape == x.shape

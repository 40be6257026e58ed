"""Colour drift on the built-in sample with and without chroma_steps (same checkpoints, targets, seeds).

    .venv/bin/python experiments/realism-ablation/chroma_check.py PROJECT_DIR   # a project after `dvc repro` of finetune

Prints per sample (in-mask chroma, source chroma, colour-drift gate, saturation gate).
"""
import sys, json, numpy as np, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "src"))
torch.set_num_threads(1)
from pathlib import Path
from defectforge.manifest.io import read_manifest, manifest_info
from defectforge.data.codec import read_image, read_mask
from defectforge.methods.inversion import Inversion, InversionConfig
from defectforge.methods.blended import Blended, BlendedConfig
from defectforge.diffusion.sampling import category_checkpoints as checkpoints
from defectforge.masks.target import sample_target_mask
from defectforge.metrics.gates import gate_sample, GateThresholds
split = sys.argv[1] + "/data/manifests/split.parquet"
root = Path(manifest_info(split)["dataset_root"]); df = read_manifest(split).to_pandas()
for cat, defect in [("gravel", "scratch"), ("gravel", "stain"), ("brick", "hole")]:
    ck = checkpoints(sys.argv[1] + "/data/models/finetune", cat)
    tr = df[(df.split == "train") & (df.category == cat)]
    reals = [read_mask(root / r.mask_path) for r in tr[tr.defect_type == defect].itertuples()]
    goods = [read_image(root / r.image_path) for r in tr[tr.defect_type == "good"].itertuples()][:3]
    for name, cls, cfgc in [("inversion", Inversion, InversionConfig), ("blended", Blended, BlendedConfig)]:
        for chroma in (False, True):
            m = cls.from_pretrained(ck, cfgc(steps=20, chroma_steps=chroma))
            fails = []
            for i, g in enumerate(goods):
                rng = np.random.default_rng(i)
                tgt, _ = sample_target_mask(reals, g, rng)
                res = m.generate(g, tgt, defect, seed=i)
                qc, ok, reasons = gate_sample(g, res.image, res.mask, None, None, GateThresholds())
                fails.append((round(qc.get("qc_chroma") or 0, 1), round(qc.get("qc_chroma_source") or 0, 1), bool(qc.get("qc_colour_drift")), bool(qc.get("qc_saturated"))))
            print(cat, defect, name, "chroma_steps" if chroma else "off", fails, flush=True)

"""real_range on / off with the same checkpoints (make run's data/models/finetune), seeds and
target masks (the held-out real masks of the type), on the built-in sample.

    .venv/bin/python experiments/realism-ablation/real_range_ablation.py   # after `make run`; results in experiments/realism-ablation/realism-ablation.md
"""
import os, sys, json, numpy as np
for k, v in {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2", "OMP_NUM_THREADS": "1"}.items(): os.environ.setdefault(k, v)
from pathlib import Path
import torch; torch.set_num_threads(1)
from defectforge.data.codec import read_image, read_mask
from defectforge.methods import get_method_class
from defectforge.metrics.realism import defect_stats
import defectforge.manifest.io as mio
import yaml
PARAMS = yaml.safe_load(open('params.yaml'))['generate']
sp = mio.read_manifest('data/manifests/split.parquet').to_pandas()
root = Path('data/sample')
rows = []
for cat, dt in [("brick", "hole"), ("brick", "crack"), ("gravel", "stain")]:
    tr = sp[(sp.split == 'train') & (sp.category == cat)]
    reals = [(read_image(root / r.image_path), read_mask(root / r.mask_path)) for r in tr[tr.defect_type == dt].itertuples()]
    normals = [read_image(root / r.image_path) for r in tr[tr.defect_type == 'good'].itertuples()]
    te = sp[(sp.split == 'test') & (sp.category == cat) & (sp.defect_type == dt)]
    targets = [read_mask(root / r.mask_path) for r in te.itertuples()][:6]
    for name in ("inversion", "blended"):
        cls = get_method_class(name)
        for rr in (False, True):
            cfg = cls.config_class(**{**{k: v for k, v in PARAMS[name].items() if k != 'real_range'}, "real_range": rr})
            m = cls.for_stage(cfg, 'data/models/finetune')
            m.prepare(cat, dt, reals)
            for i, t in enumerate(targets):
                res = m.generate(normals[i % len(normals)], t, dt, seed=100 + i)
                st = defect_stats(res.image, res.mask)
                rows.append(dict(set=f"{cat}/{dt}", method=name, real_range=rr, sat=st["saturated_share"], sat_px=st["saturated_px"],
                                 mean=st["in_mask_mean"], speckle=st["speckle"]))
json.dump(rows, open(Path(__file__).resolve().parent / 'real-range-ablation.json', 'w'), indent=1)
import pandas as pd
df = pd.DataFrame(rows)
df["flagged"] = (df.sat > 0.05) & (df.sat_px >= 16)
print(df.groupby(["set", "method", "real_range"]).agg(sat_mean=("sat", "mean"), sat_max=("sat", "max"), flagged=("flagged", "sum"), in_mask_mean=("mean", "mean"), speckle=("speckle", "median")).round(4).to_string())

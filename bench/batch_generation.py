"""Seconds per sample of the batched diffusion samplers at batch 1, 4, 16, 32 on the tiny
model (random weights), against the same DDIM loop written plainly with diffusers
(UNet2DConditionModel + DDIMScheduler.step, the same UNet rows per call) as the reference.

    nice -n 19 .venv/bin/python bench/batch_generation.py                      # full: writes bench/results/batch-generation.json
    nice -n 19 .venv/bin/python bench/batch_generation.py --batches 1 4 --repeats 1 --steps 2 --out /tmp/smoke.json

Per method and batch: ``ours`` = ``method.generate_batch`` (crop, sampler, paste-back) /
batch; ``plain`` = the diffusers loop over the same number of UNet rows per sample (blended:
2, the C_1 and C_good rows; anomalydiffusion: 1) / batch; ``ratio_to_batch1`` and
``ours_over_plain``. Targets (issue): batch 16 at most 0.6x batch 1, ours at most 1.05x plain.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _items(n: int):
    from defectforge.methods.base import BatchItem

    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = rng.integers(60, 200, (128, 128, 3), dtype=np.uint8)
        mask = np.zeros((128, 128), bool)
        mask[40 + i % 20 : 60 + i % 20, 50:70] = True
        out.append(BatchItem(img, mask, "pit", i))
    return out


@torch.no_grad()
def plain_loop(comps, rows: int, batch: int, steps: int, ctx) -> None:
    """The reference: a DDIM loop with diffusers' scheduler step, ``rows`` UNet rows per sample."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(comps.scheduler.config)
    sched.set_timesteps(steps)
    res, c = comps.resolution, comps.unet.config.out_channels
    z = torch.randn(batch, c, res, res)
    m = torch.zeros(batch * rows, 1, res, res)
    cond = torch.zeros(batch * rows, c, res, res)
    hidden = ctx[0:1].expand(batch * rows, -1, -1)
    for t in sched.timesteps:
        x = torch.cat([z.repeat_interleave(rows, 0), m, cond], dim=1) if comps.inpainting else z.repeat_interleave(rows, 0)
        eps = comps.unet(x, t, encoder_hidden_states=hidden).sample
        e = eps.view(batch, rows, *eps.shape[1:])
        e = e[:, 1] + 2.0 * (e[:, 0] - e[:, 1]) if rows == 2 else e[:, 0]
        z = sched.step(e, t, z, eta=0.0).prev_sample


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/batch-generation.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from defectforge.methods.anomalydiffusion.config import AnomalyDiffusionConfig
    from defectforge.methods.blended import BlendedConfig
    from defectforge.diffusion import build_tiny_components, save_tiny
    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.methods.anomalydiffusion import AnomalyDiffusion, fit_anomaly_embedding
    from defectforge.methods.blended import Blended

    tmp = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    comps = build_tiny_components(seed=0)
    comps.prompts.add_defect("pit")
    save_tiny(comps, tmp / "tiny")
    it = _items(1)[0]
    fit_anomaly_embedding(tmp / "tiny", [(it.image, it.mask)], "pit", tmp / "ad" / "anomaly_embedding", device="cpu", steps=1, batch_size=1)
    methods = {
        "blended": (Blended.from_pretrained(tmp / "tiny", BlendedConfig(steps=a.steps), device="cpu"), 2),
        "anomalydiffusion": (AnomalyDiffusion.from_pretrained({"pit": str(tmp / "ad")}, AnomalyDiffusionConfig(steps=a.steps), device="cpu"), 1),
    }
    ref = load_pipeline_components(tmp / "tiny", "cpu")
    ref.unet.eval()
    ctx, _ = ref.context("defect", "pit")
    results = {}
    for name, (method, rows) in methods.items():
        results[name] = {}
        method.generate_batch(_items(1))  # load models, warm up
        for b in a.batches:
            items = _items(b)
            ours, plain = [], []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                method.generate_batch(items)
                ours.append((time.perf_counter() - t0) / b)
                t0 = time.perf_counter()
                plain_loop(ref, rows, b, a.steps, ctx)
                plain.append((time.perf_counter() - t0) / b)
            results[name][str(b)] = {"ours_s_per_sample": min(ours), "plain_s_per_sample": min(plain), "ours_over_plain": min(ours) / min(plain)}
        base = results[name][str(a.batches[0])]["ours_s_per_sample"]
        for b in a.batches:
            results[name][str(b)]["ratio_to_batch1"] = results[name][str(b)]["ours_s_per_sample"] / base
        print(name, json.dumps(results[name], indent=1))
    out = {"what": "seconds per sample, min over repeats; tiny pixel-space UNet (random weights), 128x128 images, 64x64 crops",
           "steps": a.steps, "repeats": a.repeats, "threads": a.threads, "machine": platform.processor() or platform.machine(),
           "torch": torch.__version__, "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()

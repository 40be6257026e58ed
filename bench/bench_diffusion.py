"""Benchmark of the diffusion core on this machine (CPU, 1 torch thread).

Measures parameter counts, seconds per training step of the disentangled loss
(Eq. 5: two UNet branches per sample), and seconds per generated sample for the
`inversion` and `blended` methods. Weights are irrelevant to speed, so an untrained
tiny model is used unless --model points at a trained one.

    PYTHONPATH=src python bench/bench_diffusion.py [--model DIR] [--repeats N] [--json OUT]
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


def _timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return float(np.median(t))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=None, help="tiny or finetune directory (default: untrained tiny)")
    ap.add_argument("--defect", default="pit")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from defectforge.diffusion import build_tiny_components, load_pipeline_components, save_tiny
    from defectforge.diffusion.training import disentangled_step
    from defectforge.methods.blended import BlendedConfig, Blended
    from defectforge.methods.inversion import InversionConfig, Inversion

    tmp = Path(tempfile.mkdtemp(prefix="bench-diffusion-"))
    if args.model is None:
        comps = build_tiny_components(seed=0)
        comps.prompts.add_defect(args.defect)
        save_tiny(comps, tmp / "tiny")
        model_dir = tmp / "tiny"
    else:
        model_dir = args.model
    comps = load_pipeline_components(model_dir, device="cpu")
    res = comps.resolution
    out = {
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads={torch.get_num_threads()}",
        "model": str(model_dir),
        "profile": comps.profile,
        "resolution": res,
        "unet_parameters": sum(p.numel() for p in comps.unet.parameters()),
        "prompt_token_parameters": sum(p.numel() for p in comps.prompts.parameters()),
        "unet_config": {k: comps.unet.config[k] for k in ("block_out_channels", "down_block_types", "up_block_types", "mid_block_type", "in_channels", "cross_attention_dim")},
    }
    # training step (forward + backward + AdamW), both branches of Eq. 5 in one batched call
    rng = np.random.default_rng(0)
    opt = torch.optim.AdamW(list(comps.unet.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    comps.unet.train()
    for bs in (8, 16):
        x = torch.rand(bs, 3, res, res) * 2 - 1
        m = torch.from_numpy(rng.random((bs, 1, res, res)) < 0.1).float()

        def step():
            loss = disentangled_step(comps, x, m, ["defect"] * bs, args.defect, gen)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[f"train_seconds_per_step_batch{bs}"] = round(_timeit(step, args.repeats), 3)
        out[f"train_unet_rows_per_step_batch{bs}"] = 2 * bs
    comps.unet.eval()
    # generation: a 320 x 240 image with a 14 px pit, crop mode
    img = rng.integers(60, 200, (240, 320, 3), dtype=np.uint8)
    mask = np.zeros((240, 320), bool)
    mask[100:114, 150:164] = True
    for name, method in (
        ("inversion", Inversion.from_pretrained(model_dir, InversionConfig(steps=args.steps, guidance=2.0), device="cpu")),
        ("blended", Blended.from_pretrained(model_dir, BlendedConfig(steps=args.steps, guidance=2.0), device="cpu")),
    ):
        seeds = iter(range(1000))
        out[f"{name}_seconds_per_sample_steps{args.steps}"] = round(
            _timeit(lambda: method.generate(img, mask, args.defect, next(seeds)), args.repeats), 3
        )
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

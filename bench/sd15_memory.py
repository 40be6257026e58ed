"""Peak resident memory of the Stable Diffusion 1.5-shaped model (random weights, built offline by
``build_sd15_model``) per stage on this CPU, in fp32 and bf16: the measured rows of
docs/gpu-memory-plan.md.

    nice -n 19 .venv/bin/python bench/sd15_memory.py          # writes bench/results/sd15-memory.json
    nice -n 19 .venv/bin/python bench/sd15_memory.py --phases load generate --size 256 --out /tmp/m.json

Each measurement runs in its own child process (peak RSS only grows, so one process per row):

* ``load``: ``load_pipeline_components(dir, dtype=...)`` (UNet + CLIP text encoder + VAE);
* ``generate``: load, then one guided UNet call of the blended sampler (2 rows: C_1 and C_good,
  masked cross-attention, an AttentionStore keeping the defect row's maps for Eq. 13) at
  ``--size`` px under ``torch.no_grad``: what every sampling step of ``generate`` holds at batch 1;
* ``vae``: load, then VAE encode + decode of one ``--size`` px image (no grad);
* ``vae_adapt``: load, then AdaBLDM's decoder adaptation step (methods/blended.py ``adapt_decoder``):
  one decode of a ``--size`` px latent with gradients through the VAE decoder, backward, AdamW step;
* ``lora_step``: load in fp32, LoRA adapters (r=4 on to_q/k/v/out, as finetune), one
  ``disentangled_step`` (batch 1 = 2 UNet rows, attention loss on) + backward + AdamW step, with
  ``--dtype bf16`` under ``torch.autocast(bfloat16)`` (mixed precision: fp32 weights);
* ``lora_step_ckpt``: the same with ``unet.enable_gradient_checkpointing()``;
* ``lora_step_half_base``: ``lora_step`` with the frozen base loaded in ``--dtype`` (what finetune does
  for LoRA at precision bf16 / fp16) and fp32 adapters; ``lora_step_ckpt_half_base``: that with
  gradient checkpointing.
* ``unet_steps_ckpt_8bit``: full-UNet fine-tuning as the plan recommends for 24 GB workers: every UNet
  weight trainable in fp32, ``--dtype bf16`` autocast, gradient checkpointing, bitsandbytes' 8-bit
  AdamW (finetune's ``optimizer="adamw8bit"``), ``--train-steps`` disentangled steps (batch 1, attention
  loss on, gradient clipping as finetune), seconds per step recorded; ``unet_steps_ckpt``: the same with
  plain fp32 AdamW (13.8 GB of weights, gradients and moments before activations). Not in the default
  phases: they need 12-18 GiB free.

The model directory is ``--model-dir`` (default /tmp/sd15-bench/model, as bench/sd15_path.py; built
there when missing, never in the repository); the bf16 rows load ``<model-dir>-bf16``, the same
model saved in bf16 (built when missing), as a worker loads a half-precision checkpoint.
``--append`` adds rows to an existing result file. bitsandbytes is not a project requirement: for the
8-bit row put it on PYTHONPATH (``pip install --target /tmp/bnb-site bitsandbytes``).

    PYTHONPATH=/tmp/bnb-site .venv/bin/python bench/sd15_memory.py --phases unet_steps_ckpt_8bit --dtypes bf16 --size 256 --append
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
DEFAULT_PHASES = ("load", "generate", "vae", "vae_adapt", "lora_step", "lora_step_ckpt", "lora_step_half_base", "lora_step_ckpt_half_base")
PHASES = DEFAULT_PHASES + ("unet_steps_ckpt_8bit", "unet_steps_ckpt")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def child(phase: str, dtype_name: str, size: int, model_dir: str, train_steps: int = 1) -> dict:
    """One measurement, in this (child) process."""
    import torch

    torch.set_num_threads(1)
    from defectforge.diffusion.models import load_pipeline_components

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    train = phase.startswith(("lora_step", "unet_steps"))
    t0 = time.perf_counter()
    # a bf16 directory for the bf16 rows (as a GPU worker loads an fp16 checkpoint): converting fp32 files at load
    # holds both copies for a moment and would measure the conversion, not the stage
    half_base = phase.endswith("_half_base") and dtype_name != "fp32"
    src = model_dir if (train and not half_base) or dtype_name == "fp32" else model_dir.rstrip("/") + "-bf16"
    comps = load_pipeline_components(src, device="cpu", dtype=torch.float32 if train and not half_base else dtype)
    with torch.no_grad():  # page every weight in: safetensors are memory-mapped, RSS grows only as they are read
        for mod in (comps.unet, comps.autoencoder, getattr(comps.prompts, "text_encoder", None)):
            for p in (mod.parameters() if mod is not None else ()):
                p.sum()
    row = {"phase": phase, "dtype": dtype_name, "size": size, "model_dir": src, "load_seconds": round(time.perf_counter() - t0, 1),
           "rss_gib_after_load": round(current_rss_gib(), 3), "peak_rss_gib_load": round(peak_rss_gib(), 3)}
    lat = size // comps.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    if phase == "generate":
        from defectforge.diffusion.attention import AttentionStore

        comps.unet.eval()
        ctx_d, kinds = comps.context("defect", "scratch")
        ctx_g, _ = comps.context("good")
        z = torch.randn(2, comps.latent_channels, lat, lat, generator=g).to(dtype)
        m = torch.zeros(2, 1, lat, lat, dtype=dtype)
        m[..., lat // 4: lat // 2, lat // 4: lat // 2] = 1
        store = AttentionStore(rows=[0])
        with torch.no_grad():
            out = comps.eps(z, torch.tensor([500]), torch.cat([ctx_d, ctx_g]).to(dtype), kinds.expand(2, -1), m, cond_image=z, store=store)
        assert torch.isfinite(out.float()).all() and len(store) > 0
        row["unet_rows"] = 2
    elif phase == "vae":
        x = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(dtype)
        with torch.no_grad():
            z0 = comps.encode(x)
            img = comps.decode(z0)
        assert img.shape == x.shape
    elif phase == "vae_adapt":
        ae = comps.autoencoder
        ae.requires_grad_(False)
        params = list(ae.decoder.parameters()) + list(ae.post_quant_conv.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        z = torch.randn(1, comps.latent_channels, lat, lat, generator=g).to(dtype)
        loss = comps.decode(z).float().pow(2).mean()
        loss.backward()
        opt.step()
        row["trainable_parameters"] = sum(p.numel() for p in params)
    elif phase.startswith("unet_steps"):
        from defectforge.diffusion.training import _adamw, autocast_for, disentangled_step

        comps.unet.requires_grad_(True)  # the full UNet, fp32 master weights (mixed precision: autocast casts them)
        comps.unet.enable_gradient_checkpointing()
        comps.unet.train()
        params = [p for p in comps.unet.parameters() if p.requires_grad]
        opt = _adamw([{"params": params, "lr": 1e-5}], "adamw8bit" if phase.endswith("_8bit") else "adamw")
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4: size // 2, size // 4: size // 2] = 1
        step_s, losses = [], []
        for _ in range(train_steps):
            ts = time.perf_counter()
            with autocast_for(comps.device, dtype_name):
                out = disentangled_step(comps, x, mask, ["defect"], "scratch", g, loss_norm="area", attention_loss=3.0)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step_s.append(round(time.perf_counter() - ts, 1))
            losses.append(round(out["loss"].item(), 5))
            assert torch.isfinite(out["loss"]).all()
        states = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
        row.update(unet_rows=2, trainable_parameters=sum(p.numel() for p in params), autocast=dtype_name != "fp32",
                   gradient_checkpointing=True, optimizer=type(opt).__module__ + "." + type(opt).__name__,
                   optimizer_state_gib=round(sum(v.numel() * v.element_size() for v in states) / GIB, 3),
                   steps=train_steps, seconds_per_step=step_s, losses=losses)
    elif train:
        from peft import LoraConfig

        from defectforge.diffusion.training import autocast_for, disentangled_step

        comps.unet.requires_grad_(False)
        comps.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        if phase.startswith("lora_step_ckpt"):
            comps.unet.enable_gradient_checkpointing()
        comps.unet.train()
        params = [p for p in comps.unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
        x = torch.rand(1, 3, size, size, generator=g) * 2 - 1
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4: size // 2, size // 4: size // 2] = 1
        with autocast_for(comps.device, dtype_name):
            out = disentangled_step(comps, x, mask, ["defect"], "scratch", g, loss_norm="area", attention_loss=3.0)
        out["loss"].backward()
        opt.step()
        assert torch.isfinite(out["loss"]).all()
        row.update(unet_rows=2, trainable_parameters=sum(p.numel() for p in params), autocast=dtype_name != "fp32")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_gib"] = round(peak_rss_gib(), 3)
    row["work_gib"] = round(row["peak_rss_gib"] - row["rss_gib_after_load"], 3)  # on top of the loaded weights
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phases", nargs="+", default=list(DEFAULT_PHASES), choices=PHASES)
    ap.add_argument("--train-steps", type=int, default=2, help="optimiser steps of the unet_steps* phases")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--model-dir", default="/tmp/sd15-bench/model")
    ap.add_argument("--out", default="bench/results/sd15-memory.json")
    ap.add_argument("--append", action="store_true", help="add the rows to --out's (replacing same phase + dtype + size)")
    ap.add_argument("--child", nargs=2, metavar=("PHASE", "DTYPE"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print("ROW " + json.dumps(child(*a.child, a.size, a.model_dir, a.train_steps)), flush=True)
        return
    model_dir = Path(a.model_dir)
    if Path.cwd().resolve() in model_dir.resolve().parents:
        raise SystemExit(f"{model_dir}: the 4 GB model directory must not go into the repository")
    for d, dt in ((model_dir, "float32"), (Path(str(model_dir) + "-bf16"), "bfloat16")):
        if not (d / "model_index.json").is_file() and (dt == "float32" or "bf16" in a.dtypes):
            subprocess.run([sys.executable, "-c", "import sys, torch; from defectforge.diffusion.models import build_sd15_model; "
                            "build_sd15_model(sys.argv[1], seed=0, dtype=getattr(torch, sys.argv[2]))", str(d), dt], check=True)
    import torch

    rows, load_before = [], os.getloadavg()[0]
    for phase in a.phases:
        for dt in a.dtypes:
            r = subprocess.run([sys.executable, __file__, "--child", phase, dt, "--size", str(a.size), "--model-dir", str(model_dir),
                                "--train-steps", str(a.train_steps)], capture_output=True, text=True)
            line = [x for x in r.stdout.splitlines() if x.startswith("ROW ")]
            if r.returncode != 0 or not line:
                row = {"phase": phase, "dtype": dt, "size": a.size, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
            else:
                row = json.loads(line[-1][4:])
            row["load_average_1min_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {
        "what": "peak resident memory (ru_maxrss) per stage of the Stable Diffusion 1.5-shaped model with random weights "
                "(build_sd15_model: UNet 859.52 M, CLIP text 123.06 M, VAE 83.65 M parameters), CPU, one process per row",
        "model_dir": str(model_dir),
        "note": "measured on CPU: RSS includes the Python/torch runtime (~0.3-0.5 GiB) that GPU memory does not, and the CPU "
                "attention kernels differ from CUDA's (flash / memory-efficient SDPA); work_gib = peak - RSS after load is the "
                "stage's own memory on top of the weights. Seconds: one thread at nice 19 on a shared 2-core machine (load "
                "average below), not a speed figure. bf16 rows: the weights loaded in bf16 (load, generate, vae) or fp32 "
                "weights under torch.autocast(bfloat16) (lora_step*, finetune's precision: bf16)",
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "rows": rows,
    }
    if a.append and Path(a.out).is_file():
        old = json.loads(Path(a.out).read_text())
        new = {(r["phase"], r["dtype"], r["size"]) for r in rows}
        result = {**old, "rows": [r for r in old["rows"] if (r["phase"], r["dtype"], r["size"]) not in new] + rows,
                  "appended": old.get("appended", []) + [{"phases": a.phases, "dtypes": a.dtypes, "commit": result["commit"],
                                                           "load_average_1min_before": result["load_average_1min_before"]}]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()

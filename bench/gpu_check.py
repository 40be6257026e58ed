"""One-command GPU check of the pretrained path at Stable Diffusion 1.5 size (random weights, built
offline): ``make gpu-check`` (the venv with the pinned torch, CUDA build) or

    .venv/bin/python bench/gpu_check.py [--out bench/results/gpu-check.json] [--budget-s 420]

On a CUDA device, in this order, writing the JSON after every part (a cut-off run keeps its numbers):

1. ``build``: the SD 1.5-shaped directory in fp16 (``build_sd15_model``, 2 GB) under ``--work-dir``;
2. ``unet``: seconds per UNet call and peak GPU memory (``torch.cuda.max_memory_allocated``) in fp16
   and bf16 at batch 1 and 16, 512 px: a plain diffusers call (``AttnProcessor2_0``, one prompt row
   per sample, and the classifier-free-guidance pair a ``StableDiffusionPipeline`` step runs) against
   the library's guided call (``DiffusionComponents.eps``, masked cross-attention, 2 rows per sample,
   the defect row's maps captured for Eq. 13), as bench/sd15_path.py does on CPU; the ratios;
3. ``stages``: the pipeline stages on one defect type of the built-in sample, as the nightly test
   (tests/diffusion/test_sd15_path.py) but on CUDA at 512 px: finetune LoRA 2 steps (attention loss,
   DefectDiffu's condition dropout, AnomalyDiffusion's embedding), generate 2 samples of every
   diffusion method with 5 DDIM steps, refine, quality: seconds and peak GPU memory per stage;
4. ``finetune_memory``: the library's ``finetune`` at 512 px, 2 steps, peak GPU memory per option:
   LoRA / full UNet, fp32 / bf16 autocast, gradient checkpointing, 8-bit AdamW (when bitsandbytes
   is installed), batch 1 and 8 (finetune.batch_size): the measured rows of docs/gpu-memory-plan.md.

Parts past ``--budget-s`` (default 420 s: the check is meant to finish within 8 minutes) are
skipped and named in the JSON. Without a CUDA device it refuses in one line (exit 2) and writes
nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

GIB = 2**30
DEV = "cuda"  # --smoke-cpu: "cpu", to check this script's code paths without a GPU (test-size model, no memory figures)
DIFFUSION = ["inversion", "blended", "defectdiffu", "anomalydiffusion"]


def refuse_without_cuda(out: str) -> None:
    """One line on stderr and exit 2 where this check cannot run, before anything is built or written."""
    import torch

    why = None
    if torch.version.cuda is None:
        why = (f"this torch ({torch.__version__}) is a CPU-only build: install the CUDA wheel of torch==2.14.1 into .venv "
               f"(make install on the GPU worker)")
    elif not torch.cuda.is_available():
        why = (f"no CUDA device visible (torch {torch.__version__}, CUDA {torch.version.cuda}, "
               f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    if why:
        print(f"gpu-check: {why}; nothing measured, {out} not written", file=sys.stderr)
        sys.exit(2)


class Check:
    def __init__(self, out: Path, budget_s: float):
        import torch

        self.torch, self.out, self.budget_s, self.t0 = torch, out, budget_s, time.perf_counter()
        props = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
        self.result = {
            "what": "the pretrained path at Stable Diffusion 1.5 size (build_sd15_model, random weights) on one CUDA device: "
                    "UNet call speed and peak GPU memory, pipeline stages, finetune memory per option",
            "device": {"name": props.name, "total_memory_gib": round(props.total_memory / GIB, 1), "capability": f"{props.major}.{props.minor}",
                       "bf16_supported": torch.cuda.is_bf16_supported()} if props else {"name": "cpu (--smoke-cpu: code paths only, test-size model)"},
            "machine": {"cpu_cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda},
            "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None,
            "note": "peak GPU memory: torch.cuda.max_memory_allocated (tensors; the caching allocator reserves somewhat more, "
                    "max_memory_reserved); seconds: CUDA-synchronised wall time, median of the repeats after warm-up",
            "budget_s": budget_s,
            "parts": {},
            "skipped": [],
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def save(self) -> None:
        self.result["seconds_total"] = round(self.elapsed(), 1)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.result, indent=2) + "\n")

    def part(self, name: str, fn) -> None:
        if self.elapsed() > self.budget_s:
            self.result["skipped"].append(name)
            print(f"[gpu-check] {name}: skipped (past the {self.budget_s:.0f} s budget)", flush=True)
            return
        t0 = time.perf_counter()
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            self.result["parts"][name] = fn()
        except Exception as e:  # one part failing must not lose the others' numbers
            self.result["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        self.result["parts"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        self.save()
        print(f"[gpu-check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    # ---- memory helpers
    def reset(self) -> None:
        import gc

        gc.collect()
        if DEV == "cuda":
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> dict:
        if DEV != "cuda":
            return {}
        c = self.torch.cuda
        return {"peak_allocated_gib": round(c.max_memory_allocated() / GIB, 3), "peak_reserved_gib": round(c.max_memory_reserved() / GIB, 3)}


def sync() -> None:
    import torch

    if DEV == "cuda":
        torch.cuda.synchronize()


def allocated_gib(peak: bool = False):
    import torch

    if DEV != "cuda":
        return None
    return round((torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / GIB, 3)


def build(work: Path) -> dict:
    import torch

    from defectforge.diffusion.models import build_sd15_model, build_tiny_latent_model

    t0 = time.perf_counter()
    if DEV != "cuda":
        d = build_tiny_latent_model(work / "tiny")
        return {"dir": str(d), "build_seconds": round(time.perf_counter() - t0, 1), "note": "--smoke-cpu: test-size model"}
    d = build_sd15_model(work / "sd15-fp16", seed=0, dtype=torch.float16)
    size = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    return {"dir": str(d), "build_seconds": round(time.perf_counter() - t0, 1), "disk_gib": round(size / GIB, 2), "dtype": "float16"}


def unet_calls(chk: Check, model_dir: Path, repeats: int = 5) -> dict:
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from defectforge.diffusion.attention import AttentionStore
    from defectforge.diffusion.models import load_pipeline_components

    out = {}
    for dname, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        chk.reset()
        comps = load_pipeline_components(model_dir, device=DEV, dtype=dtype)
        comps.unet.eval()
        unet, dev = comps.unet, comps.device
        res = {"weights_gib": allocated_gib(), "size_px": comps.resolution}
        ctx_d, kinds = comps.context("defect", "scratch")
        ctx_g, _ = comps.context("good")
        enc = comps.prompts
        text_d, text_null = enc.embed("defect", "scratch")[None].to(dev, dtype), enc.embed("null")[None].to(dev, dtype)
        lat = comps.resolution // comps.vae_scale_factor  # 512 px for SD 1.5
        g = torch.Generator().manual_seed(0)
        for b in (1, 16) if DEV == "cuda" else (1, 2):
            z = torch.randn(b, comps.latent_channels, lat, lat, generator=g).to(dev, dtype)
            m = torch.zeros(b, 1, lat, lat, device=dev, dtype=dtype)
            m[..., lat // 4: lat // 2, lat // 4: lat // 2] = 1
            t = torch.tensor([comps.scheduler.config.num_train_timesteps // 2], device=dev)
            ours_ctx = torch.cat([ctx_d.expand(b, -1, -1), ctx_g.expand(b, -1, -1)]).to(dev, dtype)
            ours_kinds = kinds.expand(2 * b, -1)

            def plain(rows):
                states = text_d.expand(b, -1, -1) if rows == b else torch.cat([text_null.expand(b, -1, -1), text_d.expand(b, -1, -1)])
                x = z if rows == b else torch.cat([z, z])
                return unet(x, t.expand(rows), encoder_hidden_states=states).sample

            def ours():
                store = AttentionStore(rows=list(range(b)))  # the defect rows' maps, as blended keeps them
                o = comps.eps(torch.cat([z, z]), t, ours_ctx, ours_kinds, torch.cat([m, m]), cond_image=torch.cat([z, z]), store=store)
                assert len(store) > 0
                return o

            variants = {"plain_1row_per_sample": lambda: plain(b), "plain_cfg_2rows_per_sample": lambda: plain(2 * b),
                        "ours_guided_2rows_per_sample": ours}
            times, peaks, finite = {k: [] for k in variants}, {}, {}
            for name, fn in variants.items():
                if name.startswith("plain"):
                    unet.set_attn_processor(AttnProcessor2_0())
                else:
                    comps.processors_on(unet)
                sync()
                chk.reset()
                with torch.no_grad():
                    for rep in range(repeats + 2):  # 2 warm-up calls (kernel selection, allocator)
                        sync()
                        t0 = time.perf_counter()
                        o = fn()
                        sync()
                        if rep >= 2:
                            times[name].append(time.perf_counter() - t0)
                finite[name] = bool(torch.isfinite(o).all())
                peaks[name] = allocated_gib(peak=True)
                del o
            med = {k: statistics.median(v) for k, v in times.items()}
            res[f"batch{b}"] = {
                "seconds_per_unet_call": {k: round(v, 4) for k, v in med.items()},
                "peak_allocated_gib": peaks,
                "outputs_finite": finite,
                "ratio_ours_guided_to_plain_cfg": round(med["ours_guided_2rows_per_sample"] / med["plain_cfg_2rows_per_sample"], 3),
            }
            print(f"[gpu-check] unet {dname} batch {b}: {res[f'batch{b}']['seconds_per_unet_call']}", flush=True)
        out[dname] = res
        del comps, unet
    return out


def sample_split(work: Path) -> Path:
    """The built-in sample reduced to one category and one defect type, ingested and split."""
    from defectforge.params.data import DataParams
    from defectforge.params.split import SplitParams
    from defectforge.data.sample import make_sample
    from defectforge.pipeline import ingest, split

    root = work / "sample"
    make_sample(root, seed=0, size=96, n_train_good=3, n_test_good=2, n_defect=6)
    shutil.rmtree(root / "gravel")
    for part in ("test", "ground_truth"):
        shutil.rmtree(root / "brick" / part / "hole")
    source = ingest.run(DataParams(layout="mvtec", root=str(root)), work / "source.parquet", progress=False)
    return split.run(SplitParams(), source, work / "split.parquet")


def stages(chk: Check, model_dir: Path, work: Path) -> dict:
    from defectforge.params.finetune import FinetuneParams
    from defectforge.params.generate import GenerateParams
    from defectforge.params.pretrain import PretrainParams
    from defectforge.params.quality import QualityParams
    from defectforge.params.refine import RefineParams
    from defectforge.pipeline import finetune, generate, pretrain, quality, refine

    sp = sample_split(work)
    pre = PretrainParams(profile="pretrained", base=str(model_dir), device=DEV)
    fin = FinetuneParams(mode="lora", steps=2, batch_size=1, attention_loss=1.0, cond_dropout_product=0.2, cond_dropout_defect=0.2,
                         anomaly_embedding=True, anomaly_steps=2, device=DEV)
    common = {"steps": 5, "device": DEV}
    gen = GenerateParams(methods=DIFFUSION, n_per_defect=2, shard_size=2, inversion={**common}, blended={**common, "adapt_steps": 2},
                         defectdiffu={**common, "attention_fraction": 0.5}, anomalydiffusion={**common})
    runs = {
        "pretrain": lambda: pretrain.run(pre, sp, work / "pretrain", needed=gen.model_needs(), progress=False),
        "finetune_lora": lambda: finetune.run(fin, sp, work / "pretrain", work / "finetune", needed=gen.model_needs(), progress=False),
        "generate": lambda: generate.run(gen, sp, work / "generated", checkpoints=work / "finetune", progress=False),
        "refine": lambda: refine.run(RefineParams(), sp, work / "generated", work / "refined"),  # returns the refined manifest
        # random weights make noise: the set gates (saturation, colour drift, pass rate) would rightly fail, so they are off
        "quality": lambda: quality.run(QualityParams(set_gates={"min_pass_rate": None, "saturated_samples_max": None,
                                                                "colour_drift_samples_max": None}), sp, made["refine"],
                                       work / "quality", progress=False),
    }
    out, made = {}, {}
    for name, fn in runs.items():
        chk.reset()
        t0 = time.perf_counter()
        made[name] = fn()
        out[name] = {"seconds": round(time.perf_counter() - t0, 1), **chk.peak()}
        print(f"[gpu-check] stage {name}: {out[name]}", flush=True)
    out["generated_images"] = len(list((work / "generated").rglob("*.png")))
    return out


def finetune_memory(chk: Check, model_dir: Path, work: Path) -> dict:
    import importlib.util

    import numpy as np
    import torch

    from defectforge.diffusion.models import load_pipeline_components
    from defectforge.diffusion.training import finetune

    res = load_pipeline_components(model_dir, device="cpu").resolution  # 512 px for SD 1.5
    rng = np.random.default_rng(0)
    defects = []
    for _ in range(4):
        img = rng.integers(60, 200, (res, res, 3), dtype=np.uint8)
        m = np.zeros((res, res), bool)
        m[res * 3 // 8: res * 5 // 8, res // 4: res * 5 // 8] = True
        defects.append((img, m))
    configs = [
        ("lora", "fp32", False, "adamw", 1), ("lora", "bf16", False, "adamw", 1), ("lora", "bf16", False, "adamw", 8),
        ("lora", "bf16", True, "adamw", 8), ("lora", "bf16", True, "adamw", 16),
        ("unet", "fp32", False, "adamw", 1), ("unet", "bf16", False, "adamw", 1), ("unet", "bf16", True, "adamw", 1),
        ("unet", "bf16", True, "adamw", 8),
    ]
    if DEV == "cuda":  # fp16 autocast + GradScaler is CUDA-only: this is where that code path runs
        configs += [("lora", "fp16", False, "adamw", 1), ("unet", "fp16", True, "adamw", 1)]
    if importlib.util.find_spec("bitsandbytes") is not None:
        configs += [("unet", "bf16", True, "adamw8bit", 1), ("unet", "bf16", True, "adamw8bit", 8)]
    out = {}
    for mode, prec, ckpt, optim, b in configs:
        key = f"{mode}-{prec}{'-ckpt' if ckpt else ''}{'-8bit' if optim != 'adamw' else ''}-b{b}"
        if chk.elapsed() > chk.budget_s:
            out[key] = {"skipped": "past the time budget"}
            continue
        chk.reset()
        t0 = time.perf_counter()
        try:
            m = finetune(str(model_dir), defects, "scratch", work / "ft-mem" / key, mode=mode, steps=2, batch_size=b, attention_loss=1.0,
                         precision=prec, gradient_checkpointing=ckpt, optimizer=optim, device=DEV, progress=False)
            loss = [v for k, v in m.items() if "loss" in k and isinstance(v, (int, float))]
            out[key] = {"seconds": round(time.perf_counter() - t0, 1), "seconds_per_step": m["seconds_per_step"], **chk.peak(),
                        "losses_finite": all(math.isfinite(v) for v in loss)}
        except torch.cuda.OutOfMemoryError as e:
            out[key] = {"oom": str(e).splitlines()[0], **chk.peak()}
        shutil.rmtree(work / "ft-mem" / key, ignore_errors=True)
        print(f"[gpu-check] finetune {key}: {out[key]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/gpu-check.json")
    ap.add_argument("--work-dir", default=None, help="where the 2 GB model and the stage outputs go (default: a temporary folder)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--smoke-cpu", action="store_true", help="run every part on CPU with the test-size model (checks the code paths)")
    a = ap.parse_args()
    global DEV
    if a.smoke_cpu:
        DEV = "cpu"
    else:
        refuse_without_cuda(a.out)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="defectforge-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    chk = Check(Path(a.out), a.budget_s)
    chk.result["work_dir"] = str(work)
    try:
        chk.part("build", lambda: build(work))
        model_dir = Path(chk.result["parts"]["build"].get("dir", work / "sd15-fp16"))
        chk.part("unet", lambda: unet_calls(chk, model_dir))
        chk.part("stages", lambda: stages(chk, model_dir, work))
        chk.part("finetune_memory", lambda: finetune_memory(chk, model_dir, work))
    finally:
        chk.save()
        if not a.keep and not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    errors = [k for k, v in chk.result["parts"].items() if "error" in v]
    print(f"gpu-check: wrote {a.out} in {chk.elapsed():.0f} s" + (f"; failed parts: {errors}" if errors else "")
          + (f"; skipped: {chk.result['skipped']}" if chk.result["skipped"] else ""))
    sys.exit(1 if errors else 0)


if __name__ == "__main__":
    main()

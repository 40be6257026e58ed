"""The pretrained path at Stable Diffusion 1.5 size (random weights) end to end, stage by stage.

Runs the stages of the nightly test tests/diffusion/test_sd15_path.py (one defect type of the
built-in sample; LoRA fine-tune, 2 steps, attention loss + DefectDiffu condition dropout +
AnomalyDiffusion embedding; inversion, blended, defectdiffu, anomalydiffusion, 2 samples each,
3 DDIM steps; refine; quality), each stage in its own process, and records per stage: wall
seconds, peak resident memory of that process (wait4's ru_maxrss), the UNet forward calls it
made (count, seconds, seconds per call, by batch size and with/without gradient).

    nice -n 19 .venv/bin/python bench/sd15_end_to_end.py --res 256 [--model /tmp/sd15-bench/model]

The model directory is an SD 1.5-shaped fp32 text-to-image directory (build_sd15_model; built
under --work when --model does not exist); the resolution is set by a symlinked view with the
UNet's sample_size = res / 8. Output: bench/results/sd15-end-to-end.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _path_module():
    spec = importlib.util.spec_from_file_location("sd15_path_stages", REPO / "tests" / "diffusion" / "test_sd15_path.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _count_unet_calls(stats: dict) -> None:
    """Time every UNet2DConditionModel forward of this process into ``stats``."""
    import torch
    from diffusers import UNet2DConditionModel

    forward = UNet2DConditionModel.forward

    def timed(self, sample, *a, **k):
        t0 = time.perf_counter()
        out = forward(self, sample, *a, **k)
        dt = time.perf_counter() - t0
        key = f"batch{sample.shape[0]}_{'grad' if torch.is_grad_enabled() else 'nograd'}_{sample.shape[-1] * 8}px"
        s = stats.setdefault(key, {"calls": 0, "seconds": 0.0})
        s["calls"] += 1
        s["seconds"] += dt
        return out

    UNet2DConditionModel.forward = timed


def child(stage: str, work: Path, model: Path, out: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    mod = _path_module()
    unet: dict = {}
    _count_unet_calls(unet)
    methods: dict = {}
    if stage == "generate":  # seconds per method (the stage runs each method's plan through run_plan, looked up at each call)
        from defectforge.pipeline import generate

        run_plan = generate.run_plan

        def timed_plan(plan, *a, **k):
            t = time.perf_counter()
            try:
                return run_plan(plan, *a, **k)
            finally:
                methods[plan.name] = round(time.perf_counter() - t, 2)

        generate.run_plan = timed_plan
    t0 = time.perf_counter()
    mod.run_stage(stage, work, model)
    seconds = time.perf_counter() - t0
    for s in unet.values():
        s["seconds"] = round(s["seconds"], 2)
        s["seconds_per_call"] = round(s["seconds"] / s["calls"], 3)
    out.write_text(json.dumps({"seconds_in_process": round(seconds, 2), "unet": unet, **({"seconds_per_method": methods} if methods else {})}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--model", type=Path, default=Path("/tmp/sd15-bench/model"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/sd15-e2e"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sd15-end-to-end.json")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.stage:
        return child(a.stage, a.work, a.model, a.stats)

    import shutil

    mod = _path_module()
    if a.work.exists():
        shutil.rmtree(a.work)
    a.work.mkdir(parents=True)
    built = not (a.model / "model_index.json").is_file()
    t0 = time.perf_counter()
    if built:
        from defectforge.diffusion.models import build_sd15_model

        full = build_sd15_model(a.work / "sd15", seed=0)
    else:
        full = a.model
    build_s = time.perf_counter() - t0
    view = mod.view_at(full, a.work / f"sd15-{a.res}", a.res // 8)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "src"], cwd=REPO, capture_output=True, text=True).stdout.strip())
    rows = {}
    load = [os.getloadavg()]
    for stage in mod.STAGES:
        stats = a.work / f"{stage}.stats.json"
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, __file__, "--stage", stage, "--work", str(a.work), "--model", str(view), "--stats", str(stats)],
                             env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        load.append(os.getloadavg())
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"stage {stage} failed (exit {os.waitstatus_to_exitcode(status)})")
        row = {"seconds": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), **json.loads(stats.read_text())}
        rows[stage] = row
        print(stage, json.dumps(row), flush=True)
    mod.check_outputs(a.work)  # the nightly test's checks on what the stages wrote
    result = {
        "what": "SD 1.5-size pretrained path (UNet 859.52 M, CLIP text 123.06 M, VAE 83.65 M, random weights, fp32) on CPU, "
                "one defect type; each stage in its own process (peak RSS = that process's ru_maxrss)",
        "resolution": a.res, "threads": int(os.environ.get("OMP_NUM_THREADS", "1")), "cpus": os.cpu_count(),
        "finetune": "lora r=4, 2 steps, batch 1, attention_loss 1, cond_dropout 0.2/0.2, anomaly_embedding 2 steps",
        "generate": "inversion, blended (adapt_steps 2), defectdiffu, anomalydiffusion; 2 samples each, 3 DDIM steps, batch 1",
        "full_unet_finetune": "not run: fp32 AdamW = 4 x 859.52 M x 4 B = 13.75 GB (weights, grads, 2 moments) before activations",
        "model_built_here_s": round(build_s, 1) if built else None,
        "load_average_1min": [round(x[0], 2) for x in load], "git_head_at_start": head, "src_modified_at_start": dirty,
        "unet_keys": "UNet rows per call (batch), with or without gradient, resolution; seconds_per_call = forward only", "stages": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    if built:
        shutil.rmtree(a.work / "sd15")


if __name__ == "__main__":
    main()

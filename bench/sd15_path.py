"""Seconds per UNet call and peak resident memory of the full-size Stable Diffusion 1.5 UNet
(random weights, built offline by ``build_sd15_model``) on this CPU: a plain diffusers call
against the library's own guided call, at 256 and 512 px, batch 1 (one sample).

    nice -n 19 .venv/bin/python bench/sd15_path.py                       # writes bench/results/sd15-path.json
    nice -n 19 .venv/bin/python bench/sd15_path.py --sizes 256 --repeats 1 --out /tmp/smoke.json

The model directory goes to ``--model-dir`` (default /tmp/sd15-bench/model, never the repo;
about 4.3 GB in fp32), built in a child process so its peak memory is measured on its own,
and reused when it already exists (``--rebuild`` forces a new one).

Per size, with the same weights, latents, timestep and one thread:

* ``plain_1row``: ``unet(latents, t, encoder_hidden_states)`` with diffusers' default attention
  (``AttnProcessor2_0``) and one 77-token prompt: a ``StableDiffusionPipeline`` call without
  classifier-free guidance;
* ``plain_cfg_2rows``: the same with 2 rows (unconditional + prompt), what the pipeline runs per
  step at its default guidance;
* ``ours_1row``: ``DiffusionComponents.eps`` as the samplers call it, masked cross-attention
  (``MaskedCrossAttnProcessor``) over ``[C_inside, C_outside]`` (154 tokens) and a region mask;
* ``ours_guided_2rows``: the blended sampler's guided call (``methods/blended.py``): 2 rows
  (C_1 = defect inside, C_good), region mask, and an ``AttentionStore`` capturing the defect
  row's cross-attention maps for the attention mask (Eq. 13);
* ``ours_2rows_no_capture``: the same 2 rows without the ``AttentionStore``: what the capture costs.

Ratios: ``ours_1row / plain_1row`` and ``ours_guided_2rows / plain_cfg_2rows`` (issue target:
at most 1.1x), of the medians and of the minima (the least disturbed repeat, the steadier figure
on a shared machine). Variants are interleaved within each repeat (ABCD ABCD ...), so drift from
other work on the machine hits all of them alike.

``--sampler-steps N`` (N >= 3) adds the whole sampler step (``sampler_step`` in the result): the
blended method (``Blended.generate``, batch 1, guidance 2: one 2-row UNet call per step, latent
blending, the x0 bound, the DDIM update, the AttentionStore) against diffusers'
``StableDiffusionInpaintPipeline`` over the same 4-channel UNet, which runs blended latent
diffusion itself (classifier-free guidance at 2: one 2-row call, ``scheduler.step``, the latent
blend), the same prompt embeddings, image size and N DDIM steps (``output_type="latent"``). A step
is timed as the interval between the starts of consecutive UNet calls (N - 1 per run), so the
setup before the first call (encoding, crop, masks) and the decode after the last are not in it.
Runs alternate ours / plain for ``--repeats`` rounds after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

GIB = 2**30


def peak_rss_gib(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / GIB  # ru_maxrss is in KiB on Linux


def current_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def git_version() -> dict:
    """HEAD and the uncommitted changes under src/defectforge/diffusion (the code being timed)."""
    def git(*args):
        r = subprocess.run(["git", *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "uncommitted_in_diffusion": git("status", "--porcelain", "src/defectforge/diffusion")}


def build(model_dir: Path, inpainting: bool, threads: int) -> dict:
    """Build the directory in a child process: its own peak memory, nothing left in this one."""
    code = (
        "import sys, torch; torch.set_num_threads(int(sys.argv[3]));"
        "from defectforge.diffusion.models import build_sd15_model;"
        "build_sd15_model(sys.argv[1], inpainting=sys.argv[2] == '1', seed=0)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(model_dir), "1" if inpainting else "0", str(threads)], check=True)
    size = sum(f.stat().st_size for f in model_dir.rglob("*") if f.is_file())
    return {"built": True, "seconds": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(peak_rss_gib(resource.RUSAGE_CHILDREN), 2),
            "disk_gib": round(size / GIB, 2)}


def sampler_step(comps, size: int, steps: int, repeats: int, enc) -> dict:
    """Seconds per whole sampler step: ours (blended, batch 1) vs StableDiffusionInpaintPipeline (see module doc)."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from PIL import Image

    from defectforge.methods.blended import Blended, BlendedConfig

    if steps < 3:
        raise SystemExit("--sampler-steps: at least 3 (N - 1 step intervals per run)")
    sample_size = comps.unet.config.sample_size
    comps.unet.register_to_config(sample_size=size // comps.vae_scale_factor)  # the library's resolution: sample_size x 8
    starts: list[float] = []
    forward = UNet2DConditionModel.forward

    def timed(self, *x, **k):
        starts.append(time.perf_counter())
        return forward(self, *x, **k)

    UNet2DConditionModel.forward = timed
    cfg = BlendedConfig(steps=steps, device="cpu", adapt_steps=0, trimap=False, guidance=2.0)
    ours = Blended.from_pretrained(comps, cfg)  # the loaded weights themselves: one copy for both
    rng = np.random.default_rng(0)
    image = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[size // 4: size // 2, size // 4: size // 2] = True
    oc = ours.models.get("scratch")
    pipe = StableDiffusionInpaintPipeline(vae=oc.autoencoder, text_encoder=oc.prompts.text_encoder, tokenizer=oc.prompts.tokenizer,
                                          unet=oc.unet, scheduler=DDIMScheduler.from_config(oc.scheduler.config), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    text_d, text_null = enc.embed("defect", "scratch")[None], enc.embed("null")[None]

    def run(kind: str) -> list[float]:
        starts.clear()
        if kind == "ours":
            oc.processors_on(oc.unet)
            ours.generate(image, mask, "scratch", seed=0)
        else:
            oc.unet.set_attn_processor(AttnProcessor2_0())
            pipe(prompt_embeds=text_d, negative_prompt_embeds=text_null, image=Image.fromarray(image), mask_image=Image.fromarray(mask),
                 height=size, width=size, strength=1.0, num_inference_steps=steps, guidance_scale=2.0, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
        assert len(starts) == steps, (kind, len(starts))
        return [b - a for a, b in zip(starts, starts[1:])]

    per: dict[str, list[float]] = {"ours_blended": [], "plain_inpaint_pipeline": []}
    loads = []
    for rep in range(repeats + 1):  # round 0 warms up
        for kind, key in (("ours", "ours_blended"), ("plain", "plain_inpaint_pipeline")):
            dts = run(kind)
            if rep:
                per[key] += dts
            print(f"{size}px sampler step {kind} round {rep}: {[round(x, 2) for x in dts]}", flush=True)
        loads.append(round(os.getloadavg()[0], 2))
    UNet2DConditionModel.forward = forward
    comps.processors_on(comps.unet)
    comps.unet.register_to_config(sample_size=sample_size)
    med = {k: statistics.median(v) for k, v in per.items()}
    low = {k: min(v) for k, v in per.items()}
    return {
        "unet_rows_per_step": 2, "batch": 1, "ddim_steps": steps,
        "seconds_per_step": {k: round(v, 3) for k, v in med.items()},
        "seconds_per_step_min": {k: round(v, 3) for k, v in low.items()},
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in per.items()},
        "ratio_ours_to_plain": round(med["ours_blended"] / med["plain_inpaint_pipeline"], 3),
        "ratio_ours_to_plain_min": round(low["ours_blended"] / low["plain_inpaint_pipeline"], 3),
        "load_average_1min_per_round": loads,
        "peak_rss_gib_so_far": round(peak_rss_gib(), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--inpainting", action="store_true", help="the 9-channel inpainting UNet instead of the text-to-image one")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--sampler-steps", type=int, default=0, help="also time whole sampler steps with this many DDIM steps (0: off)")
    ap.add_argument("--only-sampler", action="store_true", help="skip the single UNet-call variants")
    ap.add_argument("--out", default="bench/results/sd15-path.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    code_version = git_version()  # before anything is imported: the code the numbers belong to
    load_before = os.getloadavg()[0]
    model_dir = Path(a.model_dir or f"/tmp/sd15-bench/{'inpaint' if a.inpainting else 'model'}")
    if Path.cwd().resolve() in model_dir.resolve().parents:
        raise SystemExit(f"{model_dir}: the 4.3 GB model directory must not go into the repository")

    from diffusers.models.attention_processor import AttnProcessor2_0

    from defectforge.diffusion.attention import AttentionStore
    from defectforge.diffusion.models import load_pipeline_components

    if a.rebuild or not (model_dir / "model_index.json").is_file():
        build_info = build(model_dir, a.inpainting, a.threads)
    else:
        build_info = {"built": False, "note": "reused an existing directory"}
    print("build", build_info, flush=True)

    t0 = time.perf_counter()
    comps = load_pipeline_components(model_dir, device="cpu")
    comps.unet.eval()
    load = {"seconds": round(time.perf_counter() - t0, 2), "rss_gib_after": round(current_rss_gib(), 2), "peak_rss_gib": round(peak_rss_gib(), 2),
            "unet_parameters": sum(p.numel() for p in comps.unet.parameters())}
    print("load", load, flush=True)
    unet = comps.unet

    # prompts: the library's [C_inside, C_outside] contexts and the plain pipeline's single prompts
    ctx_d, kinds = comps.context("defect", "scratch")
    ctx_g, _ = comps.context("good")
    enc = comps.prompts
    text_d, text_null = enc.embed("defect", "scratch")[None], enc.embed("null")[None]  # (1, 77, 768) each
    plain_states = {1: text_d, 2: torch.cat([text_null, text_d])}
    ours_ctx = {1: ctx_d, 2: torch.cat([ctx_d, ctx_g])}
    t = torch.tensor([comps.scheduler.config.num_train_timesteps // 2])

    rows_out, sampler_out = {}, {}
    for size in a.sizes if a.sampler_steps else []:
        sampler_out[str(size)] = sampler_step(comps, size, a.sampler_steps, a.repeats, enc)
        print(size, "sampler_step", json.dumps(sampler_out[str(size)]), flush=True)
    for size in [] if a.only_sampler else a.sizes:
        lat = size // comps.vae_scale_factor
        g = torch.Generator().manual_seed(size)
        z = torch.randn(1, comps.latent_channels, lat, lat, generator=g)
        cond = torch.randn(1, comps.latent_channels, lat, lat, generator=g)
        m = torch.zeros(1, 1, lat, lat)
        m[..., lat // 4 : lat // 2, lat // 4 : lat // 2] = 1

        def plain(rows: int):
            x = z.expand(rows, -1, -1, -1)
            if comps.inpainting:  # StableDiffusionInpaintPipeline's input: [z_t, mask, masked-image latent]
                x = torch.cat([x, m.expand(rows, -1, -1, -1), ((1 - m) * cond).expand(rows, -1, -1, -1)], dim=1)
            return unet(x, t.expand(rows), encoder_hidden_states=plain_states[rows]).sample

        def ours(rows: int, capture: bool = True):
            store = AttentionStore(rows=[0]) if rows == 2 and capture else None  # the defect row's maps, as blended keeps them
            k = kinds.expand(rows, -1)
            out = comps.eps(z.expand(rows, -1, -1, -1), t, ours_ctx[rows], k, m.expand(rows, -1, -1, -1), cond_image=cond.expand(rows, -1, -1, -1), store=store)
            if store is not None:
                assert len(store) > 0, "the guided call captured no attention maps"
            return out

        variants = {"plain_1row": ("plain", 1), "plain_cfg_2rows": ("plain", 2), "ours_1row": ("ours", 1), "ours_guided_2rows": ("ours", 2),
                    "ours_2rows_no_capture": ("ours_nocap", 2)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for rep in range(a.repeats + 1):  # repeat 0 is the warm-up, not counted
            for name, (kind, rows) in variants.items():
                if kind == "plain":
                    unet.set_attn_processor(AttnProcessor2_0())
                else:
                    comps.processors_on(unet)
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = plain(rows) if kind == "plain" else ours(rows, capture=kind == "ours")
                    dt = time.perf_counter() - t0
                assert out.shape == (rows, comps.latent_channels, lat, lat) and torch.isfinite(out).all()
                if rep > 0:
                    times[name].append(dt)
                print(f"{size}px {name} rep {rep}: {dt:.2f} s", flush=True)
        comps.processors_on(unet)
        med = {k: statistics.median(v) for k, v in times.items()}
        low = {k: min(v) for k, v in times.items()}
        rows_out[str(size)] = {
            "latent": [comps.latent_channels, lat, lat],
            "seconds_per_unet_call": {k: round(v, 3) for k, v in med.items()},
            "seconds_all_repeats": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "ratio_ours_1row_to_plain_1row": round(med["ours_1row"] / med["plain_1row"], 3),
            "ratio_ours_guided_to_plain_cfg": round(med["ours_guided_2rows"] / med["plain_cfg_2rows"], 3),
            "ratio_ours_2rows_no_capture_to_plain_cfg": round(med["ours_2rows_no_capture"] / med["plain_cfg_2rows"], 3),
            # the fastest repeat of each: least disturbed by other processes on a shared machine
            "seconds_per_unet_call_min": {k: round(v, 3) for k, v in low.items()},
            "ratio_ours_1row_to_plain_1row_min": round(low["ours_1row"] / low["plain_1row"], 3),
            "ratio_ours_guided_to_plain_cfg_min": round(low["ours_guided_2rows"] / low["plain_cfg_2rows"], 3),
            "ratio_ours_2rows_no_capture_to_plain_cfg_min": round(low["ours_2rows_no_capture"] / low["plain_cfg_2rows"], 3),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
            "peak_rss_gib_so_far": round(peak_rss_gib(), 2),
            "rss_gib_after": round(current_rss_gib(), 2),
        }
        print(size, json.dumps(rows_out[str(size)]), flush=True)

    result = {
        "what": "Stable Diffusion 1.5-shaped UNet with random weights (build_sd15_model), fp32, CPU, batch 1: "
                "plain diffusers UNet call vs the library's guided call (DiffusionComponents.eps)",
        "unet": "sd15_inpaint_unet (9 channels)" if a.inpainting else "sd15_unet (4 channels)",
        "model_dir": str(model_dir),
        "threads": a.threads,
        "repeats": a.repeats,
        "timestep": int(t),
        "note": "one CPU thread at nice 19 on a 2-core machine shared with other jobs (load_average: the 1-minute load before and "
                "after each size; above 2 means the timed thread waited for a core): medians and minima over the repeats after one "
                "warm-up, variants interleaved within each repeat",
        "load_average_1min_before": round(load_before, 2),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__},
        "code": code_version,
        "build": build_info,
        "load": load,
        "sizes": rows_out,
        **({"sampler_step": sampler_out, "sampler_steps": a.sampler_steps} if sampler_out else {}),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "peak_rss_target_gib": 12,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print("wrote", a.out, "peak RSS GiB", result["peak_rss_gib"])


if __name__ == "__main__":
    main()

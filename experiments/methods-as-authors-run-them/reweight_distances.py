"""AnomalyDiffusion's attention re-weighting (Eq. 7) on the distances a real sampler produces.

    .venv/bin/python experiments/methods-as-authors-run-them/reweight_distances.py --split /tmp/mt/split.parquet \\
        --finetune /tmp/mt/models/finetune-rw-<key> --defects blowhole crack break --n 6

For each defect type, ``--n`` normal test images get one of the type's real training masks
(seeded, placed at the image centre) and go through :class:`AnomalyDiffusion` with the
sampler's log on. Per DDIM step it records the distances d = mean_c (z_t - z_0)^2 over the
(dilated) mask and what both forms of Eq. 7 make of them:

* the paper's text: w = ||m||_1 Softmax(1/d) (largest weight, median weight, share of mask
  pixels above 0.01);
* the authors' code (the library's ``adaptive_weight_map``): linear normalisation of 1/d,
  clamped to [1, 1.5] (share of mask pixels amplified, mean weight).

It also measures the in-mask contrast of the samples (mean grey level inside the mask minus a
4-px ring around it) with the re-weighting on and off (the paper's w/o-AAR ablation), the
same seeds and images. Writes experiments/methods-as-authors-run-them/reweight-distances.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402

import defectforge.methods.anomalydiffusion.method as ad  # noqa: E402
from defectforge.data.codec import read_image, read_mask  # noqa: E402
from defectforge.methods.anomalydiffusion.attention import adaptive_weight_map  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.methods.anomalydiffusion.config import AnomalyDiffusionConfig

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results
PCT = [5, 25, 50, 75, 95]


def contrast(image: np.ndarray, mask: np.ndarray, ring: int = 4) -> float:
    g = image.astype(np.float64).mean(axis=2)
    around = ndimage.binary_dilation(mask, iterations=ring) & ~mask
    return float(g[mask].mean() - g[around].mean())


def centred(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The mask's bounding box placed at the centre of an image of ``shape`` (cropped if larger)."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1][: shape[0] - 2, : shape[1] - 2]
    out = np.zeros(shape, bool)
    y0, x0 = (shape[0] - box.shape[0]) // 2, (shape[1] - box.shape[1]) // 2
    out[y0:y0 + box.shape[0], x0:x0 + box.shape[1]] = box
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", required=True)
    ap.add_argument("--finetune", required=True, help="finetune stage folder trained with finetune.anomaly_embedding: true")
    ap.add_argument("--defects", nargs="+", default=["blowhole", "crack", "break"])
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(HERE / "reweight-distances.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = read_manifest(a.split).to_pylist()
    root = Path(manifest_info(a.split)["dataset_root"])
    if not root.is_absolute():
        root = (Path(a.split).parent / root).resolve()
    goods = [r for r in rows if r["defect_type"] == "good" and r["split"] == "test"]
    rng = np.random.default_rng(0)
    result = {"argv": sys.argv[1:], "backbone": "tiny pixel-space UNet (Magnetic Tile base + fine-tune)", "types": {}}
    log: list = []
    real_sampler = ad.sample_anomalydiffusion_batch  # what generate runs (one row per sample here)

    def logged(*args, **kw):
        return real_sampler(*args, **{**kw, "log": log})

    ad.sample_anomalydiffusion_batch = logged
    for defect in a.defects:
        t0 = time.perf_counter()
        reals = [r for r in rows if r["defect_type"] == defect and r["split"] == "train"]
        category = reals[0]["category"]
        per_step: dict[int, list[np.ndarray]] = {}
        contrasts = {"reweight": [], "off": []}
        for i in range(a.n):
            g = goods[int(rng.integers(len(goods)))]
            r = reals[int(rng.integers(len(reals)))]
            image = read_image(root / g["image_path"])
            mask = centred(read_mask(root / r["mask_path"]), image.shape[:2])
            for on in (True, False):
                cfg = AnomalyDiffusionConfig(steps=a.steps, device="cpu", reweight=on)
                meth = ad.AnomalyDiffusion.for_stage(cfg, a.finetune)
                meth.prepare(category, defect, [(read_image(root / x["image_path"]), read_mask(root / x["mask_path"])) for x in reals])
                log.clear()
                out = meth.generate(image, mask, defect, seed=i)
                contrasts["reweight" if on else "off"].append(contrast(out.image, mask))
                for k, (t, d, w) in enumerate(log):
                    inside = w.new_ones(w.shape).bool() & (d > 0)
                    per_step.setdefault(k, []).append(d[inside].flatten().numpy())
        steps = {}
        for k, ds in sorted(per_step.items()):
            d = np.concatenate(ds)
            dt = torch.tensor(d, dtype=torch.float64)
            n = dt.numel()
            soft = n * torch.softmax(1.0 / dt, dim=0)  # the paper's text over one pooled "mask"
            per_sample_soft = [len(x) * torch.softmax(1.0 / torch.tensor(x, dtype=torch.float64), 0) for x in ds]
            lin = [adaptive_weight_map(torch.tensor(x).sqrt().view(1, 1, 1, -1), torch.zeros(1, 1, 1, len(x)), torch.ones(1, 1, 1, len(x))).flatten()
                   for x in ds]
            steps[k] = {
                "d_percentiles": [float(v) for v in np.percentile(d, PCT)],
                "pixels": int(n),
                "paper_softmax": {"max_weight_mean": float(np.mean([float(s.max()) for s in per_sample_soft])),
                                  "median_weight_median": float(np.median([float(s.median()) for s in per_sample_soft])),
                                  "share_above_0.01": float(np.mean([float((s > 0.01).double().mean()) for s in per_sample_soft])),
                                  "mask_pixels_mean": float(np.mean([len(x) for x in ds]))},
                "authors_linear": {"share_amplified": float(np.mean([float((w > 1 + 1e-6).double().mean()) for w in lin])),
                                   "mean_weight": float(np.mean([float(w.mean()) for w in lin])),
                                   "max_weight": float(max(float(w.max()) for w in lin))},
            }
            del soft
        result["types"][defect] = {"steps": steps, "contrast": {k: {"median": float(np.median(v)), "values": v} for k, v in contrasts.items()},
                                   "seconds": round(time.perf_counter() - t0, 1)}
        print(defect, json.dumps({k: steps[k]["d_percentiles"] for k in (0, len(steps) // 2, len(steps) - 1)}),
              "contrast", {k: round(float(np.median(v)), 1) for k, v in contrasts.items()}, flush=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()

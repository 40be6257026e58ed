"""Reference numbers of the realism scores on real Magnetic Tile defects, and what they flag.

For each defect class (MT_Blowhole, MT_Crack, MT_Break; images with an empty mask are
skipped): the pooled in-mask saturated share, the per-sample statistics of
:func:`defectforge.metrics.realism.defect_stats` (median and IQR), and the classifier
two-sample test between two seeded halves of the real defects (real vs real, three
seeds). Then three made-up variants of the same images, each scored against the real
class the way the quality stage scores a generated set:

* ``black-slab``: the mask filled with 0 (the pitch-black plateau with a hard rim that
  the unclamped diffusion sampler paints), white speckle on every 7th column;
* ``confetti``: the mask filled with pure R, G, B, white and black pixels;
* ``grey-patch``: the mask filled with one flat grey at the real class's median in-mask
  mean (the clamped sampler's textureless patch: not saturated, so only the
  intensity profile and the two-sample test can catch it).

Usage::

    python experiments/realism-ablation/realism_reference.py [--root ../shared/data/magnetic-tile] [--out experiments/realism-ablation/realism-reference.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from defectforge.data.codec import read_image, read_mask
from defectforge.metrics.gates import GateThresholds, gate_sample, real_reference
from defectforge.metrics.fidelity import crop_around_mask
from defectforge.metrics.realism import c2st_accuracy, defect_stats, intensity_distance, pooled_saturation

CLASSES = ("MT_Blowhole", "MT_Crack", "MT_Break")
PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)], np.uint8)


def load(folder: Path) -> tuple[list, int]:
    items, empty = [], 0
    for jpg in sorted((folder / "Imgs").glob("*.jpg")):
        mask = read_mask(jpg.with_suffix(".png"))
        if not mask.any():
            empty += 1
            continue
        items.append((read_image(jpg), mask))
    return items, empty


def variant(kind: str, image: np.ndarray, mask: np.ndarray, grey: float, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    if kind == "black-slab":
        out[mask] = 0
        out[mask & (np.arange(mask.shape[1])[None, :] % 7 == 0)] = 255
    elif kind == "confetti":
        out[mask] = PALETTE[rng.integers(0, len(PALETTE), int(mask.sum()))]
    elif kind == "grey-patch":
        out[mask] = int(round(grey))
    return out


def iqr(values) -> list[float]:
    return [round(float(q), 3) for q in np.percentile(values, [25, 50, 75])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="../shared/data/magnetic-tile")
    ap.add_argument("--out", default=None)
    ap.add_argument("--context", type=float, default=2.0)
    args = ap.parse_args()
    t0 = time.time()
    report = {}
    for cls in CLASSES:
        items, empty = load(Path(args.root) / cls)
        stats = [defect_stats(im, m) for im, m in items]
        crops = [crop_around_mask(im, m, context=args.context) for im, m in items]
        ref = real_reference(stats)
        n = len(crops)
        rvr, dvr = [], []
        for seed in range(3):  # two seeded halves of the real defects
            perm = np.random.default_rng(seed).permutation(n)
            a, b = perm[: n // 2], perm[n // 2 : 2 * (n // 2)]
            rvr.append(c2st_accuracy([crops[i] for i in a], [crops[i] for i in b], seed=seed)["accuracy"])
            dvr.append(intensity_distance([stats[i] for i in a], [stats[i] for i in b])["distance"])
        row = {
            "n": n, "empty_masks_skipped": empty,
            "saturation": pooled_saturation(stats),
            "in_mask_mean": iqr([s["in_mask_mean"] for s in stats]),
            "in_mask_p5_min": round(float(min(np.percentile(im.mean(2)[m], 5) for im, m in items)), 1),
            "ring_mean": iqr([s["ring_mean"] for s in stats]),
            "contrast_q25_q50_q75": iqr([s["contrast"] for s in stats]),
            "edge_sharpness": iqr([s["edge_sharpness"] for s in stats]),
            "chroma_max": round(max(s["chroma"] for s in stats), 3),
            "gate_reference": ref,
            "c2st_real_vs_real": [round(a, 4) for a in rvr],
            "intensity_distance_real_vs_real": [round(d, 3) for d in dvr],
            "real_samples_failing_realism_gates": int(sum(
                1 for im, m in items
                if any(r.startswith(("saturated", "colour drift"))
                       for r in gate_sample(im, im, m, thresholds=GateThresholds(contrast_min=0), real=ref)[2])
            )),
        }
        grey = float(np.median([s["in_mask_mean"] for s in stats]))
        rng = np.random.default_rng(0)
        for kind in ("black-slab", "confetti", "grey-patch"):
            fake = [(variant(kind, im, m, grey, rng), m, im) for im, m in items]
            fstats = [defect_stats(f, m, reference=im) for f, m, im in fake]
            flags = [gate_sample(im, f, m, real=ref)[0] for f, m, im in fake]
            row[kind] = {
                "saturation": round(pooled_saturation(fstats), 4),
                "saturated_samples": round(float(np.mean([q["qc_saturated"] for q in flags])), 4),
                "colour_drift_samples": round(float(np.mean([q["qc_colour_drift"] for q in flags])), 4),
                "contrast_median": round(float(np.median([s["contrast"] for s in fstats])), 2),
                "intensity_distance": round(intensity_distance(fstats, stats)["distance"], 3),
                "c2st_accuracy": c2st_accuracy(crops, [crop_around_mask(f, m, context=args.context) for f, m, _ in fake])["accuracy"],
            }
        report[cls] = row
        print(cls, json.dumps(row), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    print(f"{report['seconds']} s")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

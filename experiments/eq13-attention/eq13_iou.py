"""Eq. 13 on Magnetic Tile: does the refined mask from attention match what was painted?

    .venv/bin/python experiments/eq13-attention/eq13_iou.py --split /tmp/mt/split.parquet \
        --finetune before=/tmp/mt/models/finetune-before-XXXX after=/tmp/mt/models/finetune-after-YYYY

For each fine-tune (a finetune stage output: checkpoints.json + one folder per defect
type) and each class (blowhole, crack, break): ``--n`` defect-free *test* images of the
library's split, a target mask per image from the class's real *training* masks
(:func:`defectforge.masks.target.sample_target_mask`, as the generate stage does), one
``inversion`` sample each (same seeds for every fine-tune). Per sample:

* ``eq13``: :func:`defectforge.masks.refine.refine_mask` on the sample's attention
  (m' * A_def, Eq. 13, threshold 1/2, the refine stage's morphology);
* ``painted``: :func:`defectforge.masks.refine.difference_mask`, the target pixels the
  generation actually changed (the refine stage's fallback);
* IoU(eq13, painted) - the figure of merit (target >= 0.6), IoU(eq13, target),
  IoU(painted, target);
* the defect tokens' share of the joint softmax (A_def before the m' product),
  averaged over the captured steps and layers, inside and outside the target mask of
  the crop (untrained: about 1/2 and 1/2);
* which mask the refine stage would keep (``mask_source``: attention when Eq. 13 keeps
  at least ``refine.min_area_ratio`` of the target, else difference).

The inversion method runs with params.yaml's ``generate.inversion`` settings on the CPU
(``--steps`` overrides the DDIM steps). Writes ``--out`` (JSON: per sample, per class, per fine-tune).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import defectforge.methods.inversion as inversion_mod  # noqa: E402
from defectforge.data.codec import read_image, read_mask  # noqa: E402
from defectforge.diffusion.attention import AttentionStore  # noqa: E402
from defectforge.diffusion.sampling import make_crop  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.masks.refine import difference_mask, refine_mask  # noqa: E402
from defectforge.masks.target import sample_target_mask  # noqa: E402
from defectforge.diffusion.sampling import category_checkpoints as checkpoints  # noqa: E402
from defectforge.params.refine import RefineParams

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results
DEFECTS = ["blowhole", "crack", "break"]


class _KeptStore(AttentionStore):
    """The inversion method's AttentionStore, remembered so the unmasked A_def can be read."""

    last: "AttentionStore | None" = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _KeptStore.last = self


def iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


def _refine(make, radius: int, enough):
    """The refine stage's rule: morphology, or none when it erased a thin defect."""
    m = make(radius)
    return m if enough(m) or radius == 0 else make(0)


def evaluate(finetune_dir: Path, split: Path, n: int, steps: int, seed: int, classes: list[str] = DEFECTS, log=print) -> dict:
    from defectforge.methods.inversion import InversionConfig, Inversion

    rp = RefineParams()
    root = Path(manifest_info(split)["dataset_root"])
    df = read_manifest(split).to_pandas()
    category = df["category"].iloc[0]
    ckpts = checkpoints(finetune_dir, category)
    import dataclasses

    import yaml

    # the generate stage's inversion settings (params.yaml), on the CPU; --steps overrides
    given = yaml.safe_load((ROOT / "params.yaml").read_text())["generate"]["inversion"]
    fields = {f.name for f in dataclasses.fields(InversionConfig)}
    kw = {k: v for k, v in given.items() if k in fields}
    kw.update(device="cpu", **({"steps": steps} if steps else {}))
    cfg = InversionConfig(**kw)
    method = Inversion.from_pretrained(ckpts, cfg)
    goods = df[(df.split == "test") & (df.defect_type == "good")].sort_values("image_id")
    pick = np.random.default_rng(seed).choice(len(goods), size=min(n, len(goods)), replace=False)
    normals = [read_image(root / goods.iloc[int(i)].image_path) for i in sorted(pick)]
    samples, per_class = [], {}
    inversion_mod.AttentionStore = _KeptStore  # read the store the method fills (no change to the method)
    try:
        for d_i, defect in enumerate(DEFECTS):
            if defect not in ckpts or defect not in classes:
                continue
            reals = df[(df.split == "train") & (df.defect_type == defect)].sort_values("image_id")
            masks = [read_mask(root / r.mask_path) for r in reals.itertuples()]
            rows = []
            for i, normal in enumerate(normals):
                s = seed * 1000 + d_i * 100 + i
                rng = np.random.default_rng(s)
                target, _ = sample_target_mask(masks, normal, rng)
                t0 = time.perf_counter()
                res = method.generate(normal, target, defect, s)
                comps = method.models.get(defect)
                crop = make_crop(comps, normal, target, cfg.crop, cfg.context)
                share = _KeptStore.last.mean_map((comps.resolution, comps.resolution))[0].numpy()
                cm = crop.m[0, 0].cpu().numpy() > 0.5
                enough = lambda m: m.sum() >= max(1, rp.min_area_ratio * target.sum())  # noqa: E731
                eq13 = _refine(lambda r: refine_mask(res.attention, target, threshold=rp.threshold, radius=r), rp.radius, enough)
                painted = _refine(lambda r: difference_mask(normal, res.image, target, fraction=rp.difference_fraction, radius=r), rp.radius, enough)
                row = {
                    "defect": defect, "seed": s, "target_area": int(target.sum()), "eq13_area": int(eq13.sum()), "painted_area": int(painted.sum()),
                    "iou_eq13_painted": iou(eq13, painted), "iou_eq13_target": iou(eq13, target), "iou_painted_target": iou(painted, target),
                    "share_inside": float(share[cm].mean()), "share_outside": float(share[~cm].mean()),
                    "mask_source": "attention" if enough(eq13) else ("difference" if enough(painted) else "raw-fallback"),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                log(json.dumps(row))
            samples += rows
            per_class[defect] = _summary(rows)
    finally:
        inversion_mod.AttentionStore = AttentionStore
    return {"finetune": str(finetune_dir), "inversion_config": cfg.to_dict(), "refine": rp.model_dump(mode="json"),
            "per_class": per_class, "all": _summary(samples), "samples": samples}


def _summary(rows: list[dict]) -> dict:
    def mean(k):
        v = [r[k] for r in rows if r[k] is not None]
        return round(float(np.mean(v)), 4) if v else None

    keys = ("iou_eq13_painted", "iou_eq13_target", "iou_painted_target", "share_inside", "share_outside")
    return {"n": len(rows), **{k: mean(k) for k in keys},
            "attention_share": round(sum(r["mask_source"] == "attention" for r in rows) / max(1, len(rows)), 4),
            "painted_empty": sum(r["painted_area"] == 0 for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--split", default="/tmp/mt/split.parquet")
    ap.add_argument("--finetune", nargs="+", required=True, help="tag=finetune_dir ...")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="DDIM steps of the inversion method (0: params.yaml's generate.inversion.steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--classes", nargs="+", default=DEFECTS, help="evaluate only these classes (merged into --out)")
    ap.add_argument("--out", default=str(HERE / "eq13-iou.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for item in a.finetune:
        tag, path = item.split("=", 1)
        meta = json.loads((Path(path) / "checkpoints.json").read_text())
        r = evaluate(Path(path), Path(a.split), a.n, a.steps, a.seed, a.classes, log=lambda s, tag=tag: print(f"[{tag}] {s}", flush=True))
        r["finetune_metrics"] = {k: v.get("metrics", {}) for k, v in meta.items()}
        old = result.get(tag, {})
        if old.get("inversion_config") == r["inversion_config"]:  # merge classes evaluated in separate runs
            kept = [x for x in old.get("samples", []) if x["defect"] not in r["per_class"]]
            r["samples"] = sorted(kept + r["samples"], key=lambda x: (DEFECTS.index(x["defect"]), x["seed"]))
            r["per_class"] = {d: _summary([x for x in r["samples"] if x["defect"] == d]) for d in DEFECTS if any(x["defect"] == d for x in r["samples"])}
            r["all"] = _summary(r["samples"])
            r["finetune_metrics"] = {**old.get("finetune_metrics", {}), **r["finetune_metrics"]}
        result[tag] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({tag: {"all": r["all"], "per_class": r["per_class"]}}, indent=2), flush=True)


if __name__ == "__main__":
    main()

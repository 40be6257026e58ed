"""DefectDiffu's masks on Magnetic Tile: does the mask match what was painted?

    .venv/bin/python experiments/defectdiffu-tdia/defectdiffu_masks.py --split /tmp/mt/split.parquet \\
        --run attention=/tmp/mt/models/finetune-all-XXXX:attention module=/tmp/mt/models/finetune-tdia-YYYY:module

Each ``--run`` is ``tag=finetune_dir:mask_source``. For each class (blowhole, crack, break):
``--n`` defect-free *test* images of the library's split, a target mask per image from
the class's real *training* masks (:func:`defectforge.masks.target.sample_target_mask`,
as the generate stage and experiments/eq13-attention/eq13_iou.py do; same seeds for every run), one
``defectdiffu`` sample each with params.yaml's ``generate.defectdiffu`` settings and the
run's ``mask_source``:

* ``attention``: the defect tokens' share of the joint softmax, averaged over the last
  steps, iterative threshold inside the target (needs a model without TDIA);
* ``module``: the mask generation module's M_pre (Eq. 6; a fine-tune with
  ``finetune.mask_module`` > 0, TDIA or not), same threshold.

Per sample: ``painted`` = :func:`defectforge.masks.refine.difference_mask` (target pixels
whose change is at least half the largest change: what the generation actually did),
IoU(mask, painted) - the figure of merit, target >= 0.6 (issue 8, deliverable 6) -,
IoU(mask, target), IoU(painted, target), and the sample's in-mask contrast against a
ring (the realism score :func:`defectforge.metrics.realism.sample_stats`). Writes ``--out``.
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
import yaml  # noqa: E402

from defectforge.data.codec import read_image, read_mask  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.masks.refine import difference_mask  # noqa: E402
from defectforge.masks.target import sample_target_mask  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results
DEFECTS = ["blowhole", "crack", "break"]


def iou(a: np.ndarray, b: np.ndarray) -> float | None:
    union = int((a | b).sum())
    return None if union == 0 else int((a & b).sum()) / union


def evaluate(finetune_dir: Path, mask_source: str, split: Path, n: int, seed: int, log=print) -> dict:
    from defectforge.methods.defectdiffu.config import DefectDiffuConfig
    from defectforge.params.refine import RefineParams
    from defectforge.methods.defectdiffu import DefectDiffu

    rp = RefineParams()
    root = Path(manifest_info(split)["dataset_root"])
    df = read_manifest(split).to_pandas()
    category = df["category"].iloc[0]
    given = yaml.safe_load((ROOT / "params.yaml").read_text())["generate"]["defectdiffu"]
    fields = set(DefectDiffuConfig.model_fields)
    cfg = DefectDiffuConfig(**{**{k: v for k, v in given.items() if k in fields}, "device": "cpu", "mask_source": mask_source})
    method = DefectDiffu.for_stage(cfg, finetune_dir)  # as the generate stage builds it
    goods = df[(df.split == "test") & (df.defect_type == "good")].sort_values("image_id")
    pick = np.random.default_rng(seed).choice(len(goods), size=min(n, len(goods)), replace=False)
    normals = [read_image(root / goods.iloc[int(i)].image_path) for i in sorted(pick)]
    rows = []
    for d_i, defect in enumerate(DEFECTS):
        reals = df[(df.split == "train") & (df.defect_type == defect)].sort_values("image_id")
        pairs = [(read_image(root / r.image_path), read_mask(root / r.mask_path)) for r in reals.itertuples()]
        pairs = [(i, m) for i, m in pairs if m.any()]
        method.prepare(category, defect, pairs)  # the stage's call: checkpoints, and the reals' value range
        masks = [m for _, m in pairs]
        for i, normal in enumerate(normals):
            s = seed * 1000 + d_i * 100 + i
            target, _ = sample_target_mask(masks, normal, np.random.default_rng(s))
            t0 = time.perf_counter()
            res = method.generate(normal, target, defect, s)
            painted = difference_mask(normal, res.image, target, fraction=rp.difference_fraction, radius=0)
            diff = np.abs(res.image.astype(np.float32) - normal.astype(np.float32)).mean(2)
            row = {"defect": defect, "seed": s, "target_area": int(target.sum()), "mask_area": int(res.mask.sum()),
                   "painted_area": int(painted.sum()), "iou_mask_painted": iou(res.mask, painted),
                   "iou_mask_target": iou(res.mask, target), "iou_painted_target": iou(painted, target),
                   "mean_change_in_mask": float(diff[res.mask].mean()) if res.mask.any() else 0.0,
                   "mean_change_target_outside_mask": float(diff[target & ~res.mask].mean()) if (target & ~res.mask).any() else None,
                   "mask_origin": res.metadata["mask_origin"], "seconds": round(time.perf_counter() - t0, 2)}
            rows.append(row)
            log(json.dumps(row))
    return {"finetune": str(finetune_dir), "config": cfg.to_dict(), "per_class": {d: summary([r for r in rows if r["defect"] == d]) for d in DEFECTS},
            "all": summary(rows), "samples": rows}


def summary(rows: list[dict]) -> dict:
    def stat(k):
        v = np.array([r[k] for r in rows if r[k] is not None], dtype=float)
        if not len(v):
            return None
        lo, hi = np.percentile(np.random.default_rng(0).choice(v, (2000, len(v))).mean(1), [2.5, 97.5]) if len(v) > 1 else (v[0], v[0])
        return {"mean": round(float(v.mean()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)], "n": int(len(v))}

    return {k: stat(k) for k in ("iou_mask_painted", "iou_mask_target", "iou_painted_target", "mean_change_in_mask",
                                 "mean_change_target_outside_mask", "seconds")} | {
        "empty_painted": sum(r["painted_area"] == 0 for r in rows),
        "fallback_to_target": sum(r["mask_origin"].endswith("empty-target") for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="/tmp/mt/split.parquet")
    ap.add_argument("--run", nargs="+", required=True, help="tag=finetune_dir:mask_source ...")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "defectdiffu-masks.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(a.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    for item in a.run:
        tag, rest = item.split("=", 1)
        path, source = rest.rsplit(":", 1)
        r = evaluate(Path(path), source, Path(a.split), a.n, a.seed, log=lambda s, tag=tag: print(f"[{tag}] {s}", flush=True))
        r["finetune_metrics"] = {k: v.get("metrics", {}) for k, v in json.loads((Path(path) / "checkpoints.json").read_text()).items()}
        result[tag] = r
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(json.dumps({tag: {"all": r["all"], "per_class": r["per_class"]}}, indent=2), flush=True)


if __name__ == "__main__":
    main()

"""Generated target masks vs augmented ones on Magnetic Tile: which is closer to the real masks?

    .venv/bin/python experiments/target-masks/generated_masks.py --split /tmp/mt/split.parquet --steps 800 --draws 40 --repeats 3

Per defect type (the library's split): a mask model (AnomalyDiffusion Eq. 9,
:mod:`defectforge.methods.anomalydiffusion.mask_model`) is fitted on the type's *training* masks, then
``draws`` target masks are made on defect-free training images by each source:

* ``augmented/foreground`` - today's default: an augmented real shape on the object;
* ``augmented/prior`` - the same shape placed by the type's :class:`LocationPrior`;
* ``generated/<kind>`` - drawn by the mask model (shape and place).

Each set is compared with the type's *held-out* real masks by
:func:`defectforge.metrics.mask_shapes.mask_distances` (Wasserstein-1 on log area,
elongation and position); ``repeats`` independent draw sets give the spread, and the
training reals against the held-out reals give the floor (real-vs-real). Writes
experiments/target-masks/generated-masks.md, experiments/target-masks/generated-masks.json and a grid of masks.
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
from PIL import Image  # noqa: E402

from defectforge.data.codec import read_image, read_mask  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.methods.anomalydiffusion.mask_training import train_mask_model  # noqa: E402
from defectforge.masks.target import LocationPrior, sample_target_mask  # noqa: E402
from defectforge.metrics.mask_shapes import mask_distances, mask_features  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results
DEFECTS = ["blowhole", "break", "crack"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="/tmp/mt/split.parquet")
    ap.add_argument("--kind", default="diffusion", choices=["diffusion", "textual-inversion"])
    ap.add_argument("--base", default=None, help="the frozen base model folder (textual-inversion)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--draws", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--defects", nargs="+", default=DEFECTS)
    ap.add_argument("--suffix", default="")
    a = ap.parse_args()
    torch.set_num_threads(1)
    sp = read_manifest(a.split).to_pandas()
    src = Path(manifest_info(a.split)["dataset_root"])
    comps = None
    if a.kind == "textual-inversion":
        from defectforge.diffusion.models import load_pipeline_components

        comps = load_pipeline_components(a.base, device="cpu")
    goods = sp[(sp.split == "train") & (sp.defect_type == "good")].sort_values("image_id")
    results, grid_rows = {}, []
    for d in a.defects:
        train = sp[(sp.split == "train") & (sp.defect_type == d)]
        test = sp[(sp.split == "test") & (sp.defect_type == d)]
        tr = [(read_image(src / r.image_path), read_mask(src / r.mask_path)) for r in train.itertuples()]
        tr = [(i, m) for i, m in tr if m.any()]
        te = [(read_image(src / r.image_path), read_mask(src / r.mask_path)) for r in test.itertuples()]
        te = [(i, m) for i, m in te if m.any()]
        real_f = [mask_features(m, image=i) for i, m in te]
        floor = mask_distances([mask_features(m, image=i) for i, m in tr], real_f)
        t0 = time.perf_counter()
        model = train_mask_model([m for _, m in tr], kind=a.kind, comps=comps, resolution=a.resolution, steps=a.steps, batch_size=8, seed=0, progress=True)
        train_s = time.perf_counter() - t0
        prior = LocationPrior.fit([m for _, m in tr], [i for i, _ in tr])
        sets: dict[str, list[dict]] = {"augmented/foreground": [], "augmented/prior": [], f"generated/{a.kind}": []}
        empty = 0
        shown: dict[str, list[np.ndarray]] = {k: [] for k in sets}
        t0 = time.perf_counter()
        for rep in range(a.repeats):
            feats: dict[str, list[dict]] = {k: [] for k in sets}
            for j in range(a.draws):
                seed = 1000 * rep + j
                normal = read_image(src / goods.iloc[seed % len(goods)].image_path)
                rng = np.random.default_rng(seed)
                masks = {
                    "augmented/foreground": sample_target_mask([m for _, m in tr], normal, rng, placement="foreground")[0],
                    "augmented/prior": sample_target_mask([m for _, m in tr], normal, np.random.default_rng(seed), placement="prior", prior=prior)[0],
                    f"generated/{a.kind}": model.sample(normal.shape[:2], seed, steps=30),
                }
                for k, m in masks.items():
                    if m is None:
                        empty += 1
                        continue
                    feats[k].append(mask_features(m, image=normal))
                    if rep == 0 and len(shown[k]) < 8:
                        shown[k].append(m)
            for k in sets:
                sets[k].append(mask_distances(feats[k], real_f))
        sample_s = (time.perf_counter() - t0) / (a.repeats * a.draws)
        results[d] = {
            "n_train": len(tr), "n_test": len(te), "floor_real_vs_real": floor, "empty_draws": empty, "train_seconds": round(train_s, 1),
            "seconds_per_draw_all_sources": round(sample_s, 2), "model": model.meta,
            "sources": {k: {m: [r[m] for r in v] for m in ("area", "elongation", "position")} for k, v in sets.items()},
        }
        grid_rows.append((f"{d}: real (held out)", [m for _, m in te[:8]]))
        grid_rows += [(f"{d}: {k}", v) for k, v in shown.items()]
        print(json.dumps({d: results[d]["sources"]}, indent=1), flush=True)
    write(a, results, grid_rows)


def _tile(m: np.ndarray, side: int = 72) -> np.ndarray:
    return np.asarray(Image.fromarray((m * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR))


def write(a, results: dict, grid_rows) -> None:
    from PIL import ImageDraw

    side, label = 72, 190
    canvas = Image.new("L", (label + 8 * (side + 4), len(grid_rows) * (side + 4)), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, masks) in enumerate(grid_rows):
        y = r * (side + 4)
        draw.text((4, y + side // 2 - 6), name, fill=0)
        for c, m in enumerate(masks[:8]):
            canvas.paste(Image.fromarray(_tile(m, side)), (label + c * (side + 4), y))
    grid = HERE / f"generated-masks{a.suffix}.png"
    canvas.save(grid)
    (HERE / f"generated-masks{a.suffix}.json").write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2) + "\n")

    def cell(v):
        return f"{np.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]"

    lines = [
        f"# Generated target masks vs augmented ones (Magnetic Tile){(' - ' + a.suffix.strip('-')) if a.suffix else ''}", "",
        "Run by `experiments/target-masks/generated_masks.py " + " ".join(sys.argv[1:]) + "` on a 2-core CPU. Distances (Wasserstein-1) between each set of "
        f"{a.draws} target masks and the type's held-out real masks: log10 area, elongation, position (mean of relative y, relative x and "
        f"distance to the object box's edge). Mean [min, max] over {a.repeats} independent draw sets; lower is closer. The floor is the "
        "type's training reals against its held-out reals.", "",
        f"![masks](generated-masks{a.suffix}.png)", "",
        "| type | source | area | elongation | position |", "| --- | --- | --- | --- | --- |",
    ]
    for d, r in results.items():
        f = r["floor_real_vs_real"]
        lines.append(f"| {d} | real train vs held out (floor) | {f['area']:.3f} | {f['elongation']:.3f} | {f['position']:.3f} |")
        for k, v in r["sources"].items():
            lines.append(f"| {d} | {k} | {cell(v['area'])} | {cell(v['elongation'])} | {cell(v['position'])} |")
    lines += ["", "| type | real masks train / held out | mask model: training s | s per draw (all sources) | draws with no mask in the shape range (8 tries; fallback) | loss first -> last |",
              "| --- | --- | --- | --- | --- | --- |"]
    for d, r in results.items():
        m = r["model"]["metrics"]
        lines.append(f"| {d} | {r['n_train']} / {r['n_test']} | {r['train_seconds']} | {r['seconds_per_draw_all_sources']} | {r['empty_draws']} | "
                     f"{m['loss_first']:.4f} -> {m['loss_last']:.4f} |")
    out = HERE / f"generated-masks{a.suffix}.md"
    if out.exists():  # keep the hand-written findings below the generated part
        old = out.read_text()
        if "\n## Findings" in old:
            lines += ["", old[old.index("## Findings"):].rstrip()]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()

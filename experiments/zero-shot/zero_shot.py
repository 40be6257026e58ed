"""DefectDiffu zero-shot (Sec. 3.6, Eq. 12) on the built-in sample: brick holes painted on gravel.

    .venv/bin/python experiments/zero-shot/zero_shot.py --split data/manifests/split.parquet --base data/models/base/model --steps 120

No real gravel hole exists: the gravel model (fine-tuned on gravel stains, with
Algorithm 1's condition dropout) gives the product terms of Eq. 12, the brick-hole model
the defect direction eps_S(c_d, 0) - eps_S(c_g, 0). Per seed, on the same gravel image and
the same target mask (a brick-hole shape placed on the gravel):

* ``zero-shot`` - Eq. 12 with w_p = 1, w_d (default 2);
* ``product only`` - Eq. 12 with w_d = 0 (the gravel model's own normal surface: the control);
* ``brick hole at home`` - Eq. 4 with the brick-hole model on a brick image (what the
  direction paints where it was learned).

Across datasets (Magnetic Tile has one product): ``--source-split`` / ``--target-split`` take the
two categories from two split manifests, ``--source-model`` / ``--target-model`` reuse existing
fine-tunes (of the same ``--base``), ``--reference`` names the real defects to compare with, and
``--name`` the output files, e.g. a brick hole on the tile:

    .venv/bin/python experiments/zero-shot/zero_shot.py --split data/manifests/split.parquet --target-split /tmp/mt/split.parquet \
        --base /tmp/mt/models/base-be8796f19a98/model --source brick/hole --target magnetic-tile/break \
        --target-model /tmp/mt/models/finetune-all-fd6dee57cb94/magnetic-tile/break --reference magnetic-tile/blowhole \
        --name zero-shot-brick-on-tile

Measured per sample: the in-mask contrast (mean grey level inside the mask minus the
mean of a 4-px ring around it), against the real brick holes' and the real gravel
stains'. Writes experiments/zero-shot/zero-shot.md, experiments/zero-shot/zero-shot.png and experiments/zero-shot/zero-shot.json.
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
from PIL import Image, ImageDraw  # noqa: E402
from scipy import ndimage  # noqa: E402

from defectforge.data.codec import read_image, read_mask  # noqa: E402
from defectforge.diffusion.models import load_pipeline_components  # noqa: E402
from defectforge.diffusion.training import finetune  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest  # noqa: E402
from defectforge.masks.target import sample_target_mask  # noqa: E402
from defectforge.methods.defectdiffu import DefectDiffu, DefectDiffuConfig  # noqa: E402
from defectforge.methods.defectdiffu.training import defectdiffu_hooks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # this study's folder: its write-ups and results


def contrast(image: np.ndarray, mask: np.ndarray, ring: int = 4) -> float:
    g = image.astype(np.float64).mean(axis=2)
    around = ndimage.binary_dilation(mask, iterations=ring) & ~mask
    return float(g[mask].mean() - g[around].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default=str(ROOT / "data/manifests/split.parquet"))
    ap.add_argument("--base", default=str(ROOT / "data/models/base/model"))
    ap.add_argument("--work", default="/tmp/zero-shot")
    ap.add_argument("--source", default="brick/hole")
    ap.add_argument("--target", default="gravel/stain", help="a fine-tune of the target category (its product terms)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--ddim-steps", type=int, default=20)
    ap.add_argument("--w-d", type=float, default=2.0)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--source-split", default=None, help="the source category's split manifest (default: --split)")
    ap.add_argument("--target-split", default=None, help="the target category's split manifest (default: --split)")
    ap.add_argument("--source-model", default=None, help="an existing fine-tune of the source type (a fine-tune of --base)")
    ap.add_argument("--target-model", default=None, help="an existing fine-tune of the target category (a fine-tune of --base)")
    ap.add_argument("--reference", default=None, help="category/type of the target's split whose real defects are the reference "
                    "(default: --target)")
    ap.add_argument("--name", default="zero-shot", help="stem of the write-up, figure and JSON in this folder")
    a = ap.parse_args()
    torch.set_num_threads(1)
    splits = {}
    for key, path in ((a.source, a.source_split or a.split), (a.target, a.target_split or a.split)):
        splits[key] = (read_manifest(path).to_pandas(), Path(manifest_info(path)["dataset_root"]))
    work = Path(a.work)
    models = {}
    t0 = time.perf_counter()
    for key, given in ((a.source, a.source_model), (a.target, a.target_model)):
        sp, src = splits[key]
        cat, dt = key.split("/")
        out = Path(given) if given else work / cat / dt
        rows = sp[(sp.split == "train") & (sp.category == cat) & (sp.defect_type == dt)]
        goods = sp[(sp.split == "train") & (sp.category == cat) & (sp.defect_type == "good")]
        if not (out / "defectforge_finetune.json").is_file():
            if given:
                raise SystemExit(f"{given}: not a fine-tune folder (no defectforge_finetune.json)")
            finetune(a.base, [(read_image(src / r.image_path), read_mask(src / r.mask_path)) for r in rows.itertuples()], dt, out,
                     normals=[read_image(src / r.image_path) for r in goods.itertuples()], steps=a.steps, lr=3e-4, loss_norm="area",
                     attention_loss=3.0, seed=0, device="cpu", progress=False,
                     category=cat, hooks=defectdiffu_hooks(cond_dropout_product=0.2, cond_dropout_defect=0.2))
        models[key] = load_pipeline_components(str(out), device="cpu")
    train_s = time.perf_counter() - t0
    s_cat, s_dt = a.source.split("/")
    t_cat, t_dt = a.target.split("/")
    s_sp, s_src = splits[a.source]
    t_sp, t_src = splits[a.target]
    r_cat, r_dt = (a.reference or a.target).split("/")
    real_src = [(read_image(s_src / r.image_path), read_mask(s_src / r.mask_path))
                for r in s_sp[(s_sp.category == s_cat) & (s_sp.defect_type == s_dt)].itertuples()]
    real_tgt = [(read_image(t_src / r.image_path), read_mask(t_src / r.mask_path))
                for r in t_sp[(t_sp.category == r_cat) & (t_sp.defect_type == r_dt)].itertuples()]
    t_goods = t_sp[(t_sp.split == "train") & (t_sp.category == t_cat) & (t_sp.defect_type == "good")].sort_values("image_id")
    s_goods = s_sp[(s_sp.split == "train") & (s_sp.category == s_cat) & (s_sp.defect_type == "good")].sort_values("image_id")
    src_train_masks = [m for _, m in real_src[: max(1, len(real_src) // 2)]]
    zs = DefectDiffu(DefectDiffuConfig(steps=a.ddim_steps, w_p=1.0, w_d=a.w_d, real_range=False, device="cpu", mask_source="target"))
    ctrl = DefectDiffu(DefectDiffuConfig(steps=a.ddim_steps, w_p=1.0, w_d=0.0, real_range=False, device="cpu", mask_source="target"))
    rows, tiles = [], []
    t0 = time.perf_counter()
    for k in range(a.n):
        normal = read_image(t_src / t_goods.iloc[k % len(t_goods)].image_path)
        mask, _ = sample_target_mask(src_train_masks, normal, np.random.default_rng(k))
        z = zs.zero_shot(normal, mask, s_dt, k, target=models[a.target], source=models[a.source])
        c = ctrl.zero_shot(normal, mask, s_dt, k, target=models[a.target], source=models[a.source])
        home_img = read_image(s_src / s_goods.iloc[k % len(s_goods)].image_path)
        home_mask, _ = sample_target_mask(src_train_masks, home_img, np.random.default_rng(k))
        h = zs._generate(models[a.source], home_img, home_mask, s_dt, k)
        rows.append({"seed": k, "zero_shot": contrast(z.image, mask), "product_only": contrast(c.image, mask), "home": contrast(h.image, home_mask),
                     "zero_shot_change": float(np.abs(z.image.astype(float) - normal)[mask].mean()),
                     "product_only_change": float(np.abs(c.image.astype(float) - normal)[mask].mean())})
        tiles.append([normal, c.image, z.image, h.image, mask])
    gen_s = (time.perf_counter() - t0) / a.n
    ref = {"real_source": [contrast(i, m) for i, m in real_src], "real_target_defect": [contrast(i, m) for i, m in real_tgt]}
    diffs = np.array([r["zero_shot"] - r["product_only"] for r in rows])
    from scipy import stats

    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    summary = {"paired_contrast_diff_mean": float(diffs.mean()), "ci95": [float(diffs.mean() - half), float(diffs.mean() + half)],
               "n": len(diffs), "finetune_seconds": round(train_s, 1), "seconds_per_sample_3_generations": round(gen_s, 2)}
    (HERE / f"{a.name}.json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows, "reference": ref, "summary": summary}, indent=2) + "\n")
    render(tiles, real_src, HERE / f"{a.name}.png", a)
    med = lambda v: float(np.median(v))  # noqa: E731
    per = lambda key: ", ".join(f"{r[key]:.1f}" for r in rows)  # noqa: E731
    lines = [
        f"# DefectDiffu zero-shot (Eq. 12): {a.source} painted on {t_cat}", "",
        "Run by `experiments/zero-shot/zero_shot.py " + " ".join(sys.argv[1:]) + "` on a 2-core CPU, tiny profile. Two fine-tunes of one base "
        f"(`{a.base}`; Algorithm 1's condition dropout p_1 = p_2 = 0.2): {a.source} (the source defect"
        + (f", `{a.source_model}`" if a.source_model else f", {a.steps} steps, area-normed loss + attention loss 3.0") + f") and {a.target} "
        "(the target category's product terms" + (f", `{a.target_model}`" if a.target_model else f", {a.steps} steps, area-normed loss + attention loss 3.0")
        + f"). No real {t_cat} image with a {s_dt} exists; "
        f"the target masks are {s_dt} shapes placed on {t_cat}. {a.ddim_steps} DDIM steps, w_p = 1.", "",
        f"![zero-shot]({a.name}.png)", "",
        f"Columns: {t_cat} image | product only (Eq. 12, w_d = 0) | zero-shot (w_d = {a.w_d}) | the source model at home (Eq. 4 on {s_cat}) | target mask; "
        f"last row: real {a.source} (held out and train).", "",
        "| measure (in-mask mean grey level minus a 4-px ring) | median | per seed |", "| --- | --- | --- |",
        f"| real {a.source} | {med(ref['real_source']):.1f} | - |",
        f"| real {r_cat}/{r_dt} | {med(ref['real_target_defect']):.1f} | - |",
        f"| product only (w_d = 0) on {t_cat} | {med([r['product_only'] for r in rows]):.1f} | {per('product_only')} |",
        f"| zero-shot (w_d = {a.w_d}) on {t_cat} | {med([r['zero_shot'] for r in rows]):.1f} | {per('zero_shot')} |",
        f"| source model at home (Eq. 4) | {med([r['home'] for r in rows]):.1f} | {per('home')} |",
        "",
        f"Paired over {len(diffs)} seeds (same image, mask and noise): zero-shot minus product-only contrast = {diffs.mean():.1f} "
        f"[{summary['ci95'][0]:.1f}, {summary['ci95'][1]:.1f}] (95 % t-interval). Mean absolute in-mask change from the input image: "
        f"product only {np.mean([r['product_only_change'] for r in rows]):.1f}, zero-shot {np.mean([r['zero_shot_change'] for r in rows]):.1f} grey levels.",
        f"Fine-tuning both models: {summary['finetune_seconds']} s; {summary['seconds_per_sample_3_generations']} s per seed for the three generations.",
    ]
    out = HERE / f"{a.name}.md"
    if out.exists() and "\n## Findings" in out.read_text():
        old = out.read_text()
        lines += ["", old[old.index("## Findings"):].rstrip()]
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def render(tiles, reals, path: Path, a) -> None:
    side = 96
    n_cols = 5
    canvas = Image.new("RGB", (n_cols * (side + 4), (len(tiles) + 1) * (side + 4)), (255, 255, 255))
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            if im.dtype == bool:
                im = np.repeat((im * 255).astype(np.uint8)[..., None], 3, axis=2)
            canvas.paste(Image.fromarray(im).resize((side, side), Image.NEAREST), (c * (side + 4), r * (side + 4)))
    for c, (im, m) in enumerate(reals[:n_cols]):
        canvas.paste(Image.fromarray(im).resize((side, side), Image.NEAREST), (c * (side + 4), len(tiles) * (side + 4)))
    ImageDraw.Draw(canvas)
    canvas.save(path)


if __name__ == "__main__":
    main()

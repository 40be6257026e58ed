"""Dose-response on Magnetic Tile: the detector's Δ pixel AP and Δ AUPRO against the number of
synthetic samples per defect type, per method, in the papers' two detector protocols.

    nice -n 19 .venv/bin/python bench/dose_response.py --work /tmp/mt-dose \\
        --classes blowhole crack --methods copy-paste perlin blended inversion \\
        --n 0 100 400 --protocols both --budget epochs --seeds 0 1 2 3 4

Per class (one Magnetic Tile defect type; the library's split filtered to that type and the
defect-free images, so each class is its own detection problem: trained on its real defects
and normals, tested on its held-out defects and every held-out normal):

1. **Pool.** Per (class, method) the synthetic pool is generated once, at the largest n the
   grid asks of that method (``--model-free-n`` adds n values, e.g. 1000, for the model-free
   methods only), through the library's stages: generate -> refine -> quality (its per-sample
   gates give ``qc_pass``; ``--filter all`` skips them). Diffusion methods use the models of
   :func:`mt_models.build` (keyed, reused) or ``--finetune-dir``.
2. **Nested subsets.** The pool's samples (those that pass the gates, with ``--filter qc_pass``)
   are put in one fixed order, sha256(``--order-seed`` | sample_id), and n takes the first n:
   the 100 samples are among the 400, so a curve compares like with like. Each subset is
   written with the library's manifest writer (its rows, hashes and qc columns kept) and its
   file hashes are checked before the detector reads it.
3. **Detector.** Per (class, n, protocol) one run of the detector stage
   (:func:`defectforge.pipeline.detector.run`) on every method's subset at that n, paired
   seeds: ``mixed`` (real + synthetic defects + normals, the DDIM-inversion paper's) against
   real-only, ``synthetic`` (synthetic defects + normals, AnomalyDiffusion's) against
   copy-paste's subset at the same n (copy-paste is generated for it when not among the
   methods). n = 0 is the real-only reference of ``mixed`` (its absolute numbers; Δ = 0).

Results go to ``--results`` (default bench/results/dose-response.json) as each
(class, n, protocol) unit finishes, one entry per (class, method, n, protocol); a rerun skips
the entries already there (their key also hashes the detector setup and the pool, so a
changed budget, seed list or pool is run anew, never mixed in). Then one PNG per class
(``<docs-dir>/dose-response-<class>.png``: Δ pixel AP against n, a line per method, the 95 %
interval shaded, a panel per protocol; PIL drawing, no plotting dependency) and one table
``<docs-dir>/dose-response.md`` with the wall time of every pool and detector unit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from mt_detector import BENCH_DETECTOR  # noqa: E402
from mt_models import DEFECTS, build  # noqa: E402

from defectforge.data.files import atomic_write_json  # noqa: E402
from defectforge.errors import DefectforgeError  # noqa: E402
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest  # noqa: E402
from defectforge.manifest.schema import QC_COLUMNS  # noqa: E402
from defectforge.manifest.validate import check_hashes  # noqa: E402
from defectforge.params.needs import REFERENCE_METHOD
from defectforge.params.file import parse_params
from defectforge.params.generate import METHOD_NEEDS_CHECKPOINTS
from defectforge.pipeline.detector import run as run_detector  # noqa: E402
from defectforge.pipeline.generate import run as run_generate  # noqa: E402
from defectforge.pipeline.ingest import run as run_ingest  # noqa: E402
from defectforge.pipeline.quality import run as run_quality  # noqa: E402
from defectforge.pipeline.refine import run as run_refine  # noqa: E402
from defectforge.pipeline.split import run as run_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "real-only"
METRICS = ("pixel_ap", "aupro", "image_auroc")
BACKBONE = "tiny pixel-space UNet (pretrain.profile: tiny, trained here from scratch on the split's defect-free training images)"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.0f} s] {msg}", flush=True)


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def _merge(d: dict, u: dict) -> dict:
    for k, v in u.items():
        d[k] = _merge(d.get(k, {}), v) if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return d


# ------------------------------------------------------------------ arguments and params
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mt-dose")
    ap.add_argument("--root", default=str(ROOT.parent / "shared/data/magnetic-tile"))
    ap.add_argument("--classes", nargs="+", default=["blowhole", "crack"])
    ap.add_argument("--methods", nargs="+", default=["copy-paste", "perlin", "blended", "inversion"])
    ap.add_argument("--n", nargs="+", type=int, default=[0, 100, 400], help="synthetic samples per defect type (0: the real-only reference)")
    ap.add_argument("--model-free-n", nargs="*", type=int, default=[], help="more n for the model-free methods only, e.g. 1000")
    ap.add_argument("--protocols", default="both", choices=["mixed", "synthetic", "both"])
    ap.add_argument("--budget", default="epochs", choices=["steps", "epochs"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--filter", default="qc_pass", choices=["qc_pass", "all"],
                    help="qc_pass: subsets are taken among the samples that pass the quality stage's per-sample gates")
    ap.add_argument("--pool-margin", type=float, default=1.0, help="pool = ceil(largest n x margin) samples (headroom for gate failures)")
    ap.add_argument("--order-seed", type=int, default=0, help="seeds the fixed order of sample ids the nested subsets follow")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--pretrain-json", default="{}", help='extra pretrain params, e.g. \'{"threads": 1}\'')
    ap.add_argument("--finetune-steps", type=int, default=250)
    ap.add_argument("--finetune-tag", default="")
    ap.add_argument("--finetune-json", default="{}")
    ap.add_argument("--finetune-dir", default=None, help="use these finetune checkpoints as they are (no pretrain or finetune here)")
    ap.add_argument("--ddim-steps", type=int, default=30)
    ap.add_argument("--placement", default="foreground", help="generate.target_placement")
    ap.add_argument("--placement-by-type", default="{}", help='generate.target_placement_by_type, e.g. \'{"break": "prior"}\'')
    ap.add_argument("--generate-json", default="{}", help='extra generate params, e.g. \'{"inversion": {"guidance": 2.0}}\'')
    ap.add_argument("--generate-workers", type=int, default=1, help="generate.workers (Dask processes; 1 = in-process)")
    ap.add_argument("--batch-size", type=int, default=1, help="generate.batch_size (diffusion methods' samples per UNet call)")
    ap.add_argument("--detector-json", default="{}", help="detector params over bench/mt_detector.py's BENCH_DETECTOR, e.g. '{\"epochs\": 1}'")
    ap.add_argument("--results", default=str(ROOT / "bench/results/dose-response.json"))
    ap.add_argument("--docs-dir", default=str(ROOT / "experiments" / "dose-response"))
    ap.add_argument("--render-only", action="store_true", help="no training: redraw the PNGs and the table from --results")
    a = ap.parse_args(argv)
    for name in ("n", "model_free_n"):
        if any(v < 0 for v in getattr(a, name)):
            ap.error(f"--{name.replace('_', '-')}: every n must be >= 0, got {getattr(a, name)}")
    unknown = sorted(set(a.classes) - set(DEFECTS))
    if unknown:
        ap.error(f"--classes: {', '.join(unknown)} is not a Magnetic Tile defect type (known: {', '.join(DEFECTS)})")
    if len(set(a.seeds)) != len(a.seeds):
        ap.error(f"--seeds: seeds must be distinct, got {a.seeds}")
    if a.pool_margin < 1:
        ap.error(f"--pool-margin: must be >= 1, got {a.pool_margin}")
    jsons = {}
    for name in ("pretrain_json", "finetune_json", "generate_json", "detector_json", "placement_by_type"):
        try:
            jsons[name] = json.loads(getattr(a, name))
        except json.JSONDecodeError as exc:
            ap.error(f"--{name.replace('_', '-')}: not JSON ({exc})")
        if not isinstance(jsons[name], dict):
            ap.error(f"--{name.replace('_', '-')}: must be a JSON object")
    protocols = ["mixed", "synthetic"] if a.protocols == "both" else [a.protocols]
    methods = list(dict.fromkeys(a.methods))
    pool_methods = methods + ([REFERENCE_METHOD] if "synthetic" in protocols and REFERENCE_METHOD not in methods else [])
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    _merge(data, {
        "data": {"layout": "magnetic-tile", "root": a.root, "defect_types": DEFECTS},
        "pretrain": {"steps": a.pretrain_steps, "lr": 6e-4, **jsons["pretrain_json"]},
        "finetune": {"steps": a.finetune_steps, **jsons["finetune_json"]},
        "generate": _merge({"methods": pool_methods, "n_per_defect": 1, "workers": a.generate_workers, "batch_size": a.batch_size,
                            "shard_size": max(a.batch_size, data["generate"].get("shard_size", 4)),
                            "target_placement": a.placement, "target_placement_by_type": jsons["placement_by_type"],
                            **{m: {"steps": a.ddim_steps} for m in ("inversion", "blended", "defectdiffu", "anomalydiffusion")}},
                           jsons["generate_json"]),
        "detector": {**BENCH_DETECTOR, "seeds": a.seeds, "budget": a.budget, "protocol": "mixed", **jsons["detector_json"]},
        "release": {"name": "magnetic-tile"},
    })
    try:
        p = parse_params(data, "dose-response params")
    except DefectforgeError as exc:
        ap.error(str(exc))
    if not a.render_only and not Path(a.root).is_dir():
        ap.error(f"--root: {a.root} is not a folder")
    return a, p, protocols, methods, pool_methods


def n_values(a, method: str) -> list[int]:
    """The n of the grid for ``method`` (the model-free ones also get ``--model-free-n``)."""
    extra = [] if METHOD_NEEDS_CHECKPOINTS[method] else a.model_free_n
    return sorted(set(a.n) | set(extra))


# ------------------------------------------------------------------ results file
def load_results(path: Path) -> dict:
    if path.is_file():
        r = json.loads(path.read_text())
        for k in ("entries", "pools", "units"):
            r.setdefault(k, {})
        return r
    return {"entries": {}, "pools": {}, "units": {}}


def save_results(path: Path, r: dict) -> None:
    """Merge ``r`` into the file under a lock: processes running other classes may share one results file."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        disk = load_results(path)
        for k in ("entries", "pools", "units"):
            disk[k].update(r[k])
        disk["commands"] = list(dict.fromkeys(disk.get("commands", []) + r.get("commands", [])))
        disk["models_s"] = r.get("models_s", disk.get("models_s", []))
        atomic_write_json(path, disk)
    r.update(disk)


# ------------------------------------------------------------------ data, models, pools
def class_split(w: Path, split: Path, cls: str) -> Path:
    """The library's split restricted to one defect type and the defect-free images (written with the manifest writer)."""
    out = w / "splits" / f"split-{cls}.parquet"
    df = read_manifest(split).to_pandas()
    keep = df[df["defect_type"].isin([cls, "good"])].reset_index(drop=True)  # split rows keep their order (the detector iterates them)
    write_manifest(keep, out, kind="split", dataset_root=manifest_info(split)["dataset_root"])
    return out


def models(w: Path, p, a, diffusion: list[str]) -> dict:
    w.mkdir(parents=True, exist_ok=True)
    if diffusion and a.finetune_dir is None:
        return build(w, p, finetune_tag=a.finetune_tag, log=log)
    source, split = w / "source.parquet", w / "split.parquet"
    if not source.exists():
        run_ingest(p.data, source, progress=False)
    if not split.exists():
        run_split(p.split, source, split)
    out = {"source": source, "split": split}
    if diffusion:
        ft = Path(a.finetune_dir)
        if not (ft / "checkpoints.json").is_file():
            raise DefectforgeError(f"--finetune-dir: {ft} has no checkpoints.json (not a finetune stage output)")
        out["finetune"] = ft
        log(f"[finetune] given {ft}")
    return out


def pool_spec(p, a, category: str, cls: str, method: str, size: int, paths: dict) -> dict:
    """What determines a pool (its folder and every entry made from it are keyed by it)."""
    g = p.generate.model_copy(update={"methods": [method], "n_per_defect": size})
    spec = {"class": cls, "method": method, "size": size, "generate": g.method_sha256(method), "placement": g.placement_for(category, cls),
            "refine": p.refine.model_dump(mode="json"), "filter": a.filter}
    if METHOD_NEEDS_CHECKPOINTS[method]:
        spec["models"] = str(Path(paths["finetune"]).resolve())
    if a.filter == "qc_pass":
        spec["quality"] = p.quality.model_dump(mode="json")
    return spec


def make_pool(p, a, w: Path, cls: str, method: str, size: int, split_cls: Path, paths: dict, results: dict) -> dict:
    """Generate -> refine -> (quality) once per (class, method, size); returns the pool's record with its ordered ids."""
    category = read_manifest(split_cls, columns=["category"]).column(0)[0].as_py()
    spec = pool_spec(p, a, category, cls, method, size, paths)
    key = _key(spec)
    folder = w / "pools" / cls / f"{method}-{size}-{key}"
    done = folder / "pool.json"
    if done.is_file():
        rec = json.loads(done.read_text())
        log(f"[pool {cls}/{method}] reused {folder} ({size} samples, {len(rec['order'])} usable)")
        results["pools"].setdefault(key, {k: v for k, v in rec.items() if k != "order"})
        return rec
    g = p.generate.model_copy(update={"methods": [method], "n_per_defect": size})
    times = {}
    t = time.perf_counter()
    gen = run_generate(g, split_cls, folder / "generated", checkpoints=paths.get("finetune") if METHOD_NEEDS_CHECKPOINTS[method] else None, progress=False)
    times["generate_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    refined = run_refine(p.refine, split_cls, gen, folder / "refined")
    times["refine_s"] = round(time.perf_counter() - t, 1)
    df = read_manifest(refined).to_pandas()
    realism = {}
    if a.filter == "qc_pass":
        t = time.perf_counter()
        try:
            q = run_quality(p.quality, split_cls, refined, folder / "quality", progress=False)
        except DefectforgeError as exc:  # a failed set gate still wrote qc.parquet: the per-sample flags are what the subsets need
            log(f"[pool {cls}/{method}] quality: {exc}")
            q = json.loads((folder / "quality/details.json").read_text()) if (folder / "quality/details.json").is_file() else {}
        times["quality_s"] = round(time.perf_counter() - t, 1)
        qc = pd.read_parquet(folder / "quality/qc.parquet")
        df = df.drop(columns=[c for c in QC_COLUMNS if c in qc.columns and c in df.columns]).merge(
            qc[[c for c in qc.columns if c == "sample_id" or c in QC_COLUMNS]], on="sample_id", how="left")
        e = next(iter(q.get("sets", {}).values()), {})
        realism = {k: e.get(k) for k in ("pass_rate", "c2st_accuracy", "c2st_real_vs_real", "intensity_distance", "kid_mean")}
        usable = df[df["qc_pass"].fillna(False).astype(bool)]
    else:
        usable = df
    order = sorted(usable["sample_id"], key=lambda s: hashlib.sha256(f"{a.order_seed}|{s}".encode()).hexdigest())
    rec = {"key": key, "class": cls, "method": method, "size": size, "usable": len(order), "folder": str(folder),
           "refined": str(refined), "spec": spec, **times, **realism, "order": order}
    done.write_text(json.dumps(rec, indent=2) + "\n")
    results["pools"][key] = {k: v for k, v in rec.items() if k != "order"}
    log(f"[pool {cls}/{method}] {size} samples, {len(order)} usable ({a.filter}); " + ", ".join(f"{k} {v}" for k, v in times.items()))
    return rec


def write_subset(pool: dict, n: int, out: Path) -> tuple[Path, int]:
    """The pool's first n usable samples (its fixed order) as a manifest of their own; hashes checked."""
    ids = pool["order"][:n]
    df = read_manifest(pool["refined"]).to_pandas()
    qc_file = Path(pool["folder"]) / "quality/qc.parquet"
    if qc_file.is_file():  # the per-sample gates go with the rows, so the manifest says why they were kept
        qc = pd.read_parquet(qc_file)
        df = df.drop(columns=[c for c in QC_COLUMNS if c in qc.columns]).merge(qc[[c for c in qc.columns if c == "sample_id" or c in QC_COLUMNS]], on="sample_id", how="left")
    sub = df.set_index("sample_id").loc[ids].reset_index()
    write_manifest(sub, out, kind="synthetic", dataset_root=manifest_info(pool["refined"])["dataset_root"])
    check_hashes(out)
    return out, len(ids)


# ------------------------------------------------------------------ detector units
def _interval(rows: list[dict], **match) -> dict | None:
    r = next((x for x in rows if all(x.get(k) == v for k, v in match.items())), None)
    if r is None:
        return None
    mean = r.get("mean_diff", r.get("mean"))
    return {"mean": mean, "low": r["ci_low"], "high": r["ci_high"], "n_seeds": r["n_seeds"], **({"verdict": r["verdict"]} if "verdict" in r else {})}


def run_unit(p, a, w: Path, cls: str, n: int, protocol: str, methods: list[str], pools: dict, split_cls: Path, results: dict, setup: str) -> None:
    """One detector stage run: every method's subset at n (+ the protocol's reference); entries appended."""
    det = p.detector.model_copy(update={"protocol": protocol})
    manifests, used = [], {}
    for m in methods:
        path, k = write_subset(pools[m], n, w / "subsets" / cls / f"n{n}" / f"{m}-{pools[m]['key']}.parquet")
        manifests.append(path)
        used[m] = k
        if k < n:
            log(f"[subset {cls}/{m}] only {k} usable samples for n = {n} (pool {pools[m]['size']}, {a.filter})")
    t = time.perf_counter()
    d = run_detector(det, split_cls, manifests, None, w / "detector" / cls / f"n{n}-{protocol}-{setup}", progress=True)
    seconds = round(time.perf_counter() - t, 1)
    category = next(iter(d["per_category"]))
    ref = d["references"].get(protocol)
    learned = d["learned_by_protocol"].get(protocol, {}).get(category)
    runs = [r for r in d["runs"] if r["defect_type"] == cls and r["protocol"] == protocol]
    unit = f"{cls}|{n}|{protocol}|{setup}|" + ",".join(f"{m}:{pools[m]['key']}" for m in methods) if methods else f"{cls}|{n}|{protocol}|{setup}"
    results["units"][unit] = {"class": cls, "n": n, "protocol": protocol, "budget": det.budget, "setup": setup, "methods": methods, "seconds": seconds,
                              "pools": {m: pools[m]["key"] for m in methods},
                              "runs": len({(r["run"], r["seed"]) for r in runs}), "steps": {r["run"]: r["steps"] for r in runs}}

    def absolute(run):
        return {m: _interval(d["absolute"], protocol=protocol, defect_type=cls, run=run, metric=m) for m in METRICS}

    common = {"class": cls, "category": category, "protocol": protocol, "budget": det.budget, "setup": setup, "seeds": list(det.seeds),
              "reference": ref, "learned": learned, "unit_seconds": seconds, "unit_methods": methods}
    if protocol == "mixed":  # real-only: the n = 0 point of every mixed curve
        k0 = entry_key(cls, BASELINE, 0, "mixed", setup, None)
        if k0 not in results["entries"]:
            results["entries"][k0] = {**common, "method": BASELINE, "n": 0, "n_used": 0, "pool": None, "from_unit_n": n,
                                      "delta": {m: {"mean": 0.0, "low": 0.0, "high": 0.0} for m in METRICS}, "absolute": absolute(BASELINE),
                                      "steps": next((r["steps"] for r in runs if r["run"] == BASELINE), None), "finished": time.time()}
    for m in methods:
        delta = {x: _interval(d["comparisons"], protocol=protocol, defect_type=cls, method=m, metric=x) for x in METRICS}
        if m == ref:
            delta = {x: {"mean": 0.0, "low": 0.0, "high": 0.0} for x in METRICS}
        results["entries"][entry_key(cls, m, n, protocol, setup, pools[m]["key"])] = {
            **common, "method": m, "n": n, "n_used": used[m], "pool": pools[m]["key"], "pool_size": pools[m]["size"],
            "delta": delta, "absolute": absolute(m), "reference_absolute": absolute(ref) if ref else None,
            "steps": next((r["steps"] for r in runs if r["run"] == m), None), "finished": time.time()}
    save_results(Path(a.results), results)
    parts = []
    for m in methods:
        e = results["entries"][entry_key(cls, m, n, protocol, setup, pools[m]["key"])]["delta"]["pixel_ap"]
        if e and m != ref:
            parts.append(f"{m} Δ pixel AP {_ci(e)}")
    log(f"[unit {cls} n={n} {protocol}] {len(det.seeds)} seed(s), {len(methods)} method(s) + reference in {seconds} s; " + "; ".join(parts))


def entry_key(cls, method, n, protocol, setup, pool) -> str:
    return f"{cls}|{method}|{n}|{protocol}|{setup}" + (f"|{pool}" if pool else "")


def setup_key(p, a) -> str:
    """The detector setup an entry was measured with (a rerun with another one runs anew)."""
    return _key(p.detector.model_dump(mode="json", exclude={"workers", "protocol"}), a.filter, a.order_seed)


# ------------------------------------------------------------------ main
def main(argv=None) -> None:
    a, p, protocols, methods, pool_methods = parse_args(argv)
    torch.set_num_threads(1)
    w, res_path = Path(a.work), Path(a.results)
    results = load_results(res_path)
    setup = setup_key(p, a)
    pool_keys: dict[tuple[str, str], str] = {}
    if not a.render_only:
        results.setdefault("commands", []).append("bench/dose_response.py " + " ".join(sys.argv[1:] if argv is None else argv))
        diffusion = [m for m in pool_methods if METHOD_NEEDS_CHECKPOINTS[m]]
        t = time.perf_counter()
        paths = models(w, p, a, diffusion)
        log(f"[data and models] {time.perf_counter() - t:.0f} s")
        results.setdefault("models_s", []).append(round(time.perf_counter() - t, 1))
        for cls in a.classes:
            split_cls = class_split(w, paths["split"], cls)
            pools = {}
            for m in pool_methods:
                ns = n_values(a, m)
                size = math.ceil(max(ns) * a.pool_margin)
                if size == 0:
                    continue
                pools[m] = make_pool(p, a, w, cls, m, size, split_cls, paths, results)
                pool_keys[(cls, m)] = pools[m]["key"]
                save_results(res_path, results)
            grid = sorted({n for m in pool_methods for n in n_values(a, m)})
            for n in grid:
                for protocol in protocols:
                    if n == 0:
                        if protocol == "mixed" and entry_key(cls, BASELINE, 0, "mixed", setup, None) not in results["entries"]:
                            later = [x for x in grid if x > 0 and any(x in n_values(a, m) for m in methods)]
                            if not later:  # no mixed unit will train real-only: train it on its own
                                run_unit(p, a, w, cls, 0, "mixed", [], pools, split_cls, results, setup)
                        continue
                    want = [m for m in (methods if protocol == "mixed" else pool_methods) if n in n_values(a, m) and m in pools]
                    missing = [m for m in want if entry_key(cls, m, n, protocol, setup, pools[m]["key"]) not in results["entries"]]
                    if protocol == "synthetic" and REFERENCE_METHOD in pools and missing and REFERENCE_METHOD not in missing:
                        missing.append(REFERENCE_METHOD)  # the synthetic protocol's reference, trained beside them with the same seeds
                    if not missing:
                        log(f"[unit {cls} n={n} {protocol}] done before: skipped")
                        continue
                    run_unit(p, a, w, cls, n, protocol, sorted(missing), pools, split_cls, results, setup)
    # what is shown: every class and method of this setup in the results file (another process may have run other
    # classes into it); per (class, method) the pool this run used, else the pool of its latest entry
    for e in sorted(results["entries"].values(), key=lambda e: -e.get("finished", 0)):
        if e.get("setup") == setup and e.get("pool"):
            pool_keys.setdefault((e["class"], e["method"]), e["pool"])
    shown = {k: e for k, e in results["entries"].items()
             if e["setup"] == setup and (e["method"] == BASELINE or pool_keys.get((e["class"], e["method"])) == e["pool"])}
    a.classes = [c for c in DEFECTS if c in a.classes or any(e["class"] == c for e in shown.values())]
    docs = Path(a.docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    pngs = {}
    for cls in a.classes:
        mine = [e for e in shown.values() if e["class"] == cls]
        if mine:
            pngs[cls] = plot_class(mine, cls, protocols, docs / f"dose-response-{cls}.png")
    md = docs / "dose-response.md"
    md.write_text(markdown(shown, results, a, p, protocols, pngs, set(pool_keys.values()), setup))
    log(f"wrote {res_path}, {md}, " + ", ".join(str(x) for x in pngs.values()))


# ------------------------------------------------------------------ plot (PIL: matplotlib is not in the venv)
COLOURS = {"copy-paste": (90, 90, 90), "perlin": (31, 119, 180), "cutpaste": (140, 86, 75), "blended": (44, 160, 44),
           "inversion": (214, 39, 40), "defectdiffu": (148, 103, 189), "anomalydiffusion": (255, 127, 14)}


def plot_class(entries: list[dict], cls: str, protocols: list[str], out: Path) -> Path:
    """Δ pixel AP against n, one line per method with its 95 % interval shaded, one panel per protocol."""
    from PIL import Image, ImageDraw, ImageFont

    ttf = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")  # has the Δ glyph; PIL's own font does not
    font, small = ((ImageFont.truetype(str(ttf), 14), ImageFont.truetype(str(ttf), 11)) if ttf.is_file()
                   else (ImageFont.load_default(size=15), ImageFont.load_default(size=12)))
    delta = "Δ" if ttf.is_file() else "delta"
    pw, ph, ml, mr, mt, mb = 520, 380, 70, 20, 50, 60
    img = Image.new("RGB", (len(protocols) * pw, ph + 40 + 24 * 2), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 8), f"Magnetic Tile, {cls}: {delta} pixel AP vs n synthetic samples (mean over paired seeds, 95 % interval shaded)", fill="black", font=font)
    methods = sorted({e["method"] for e in entries if e["method"] != BASELINE})
    for i, protocol in enumerate(protocols):
        mine = [e for e in entries if e["protocol"] == protocol]
        x0, y0 = i * pw + ml, 40 + mt
        x1, y1 = (i + 1) * pw - mr, 40 + ph - mb
        ref = "real-only" if protocol == "mixed" else REFERENCE_METHOD
        draw.text((x0, 40 + 12), f"{protocol} (reference: {ref})", fill="black", font=font)
        series = {}
        for m in methods:
            pts = sorted((e["n"], e["delta"]["pixel_ap"]) for e in mine if e["method"] == m and e["delta"].get("pixel_ap"))
            if protocol == "mixed":
                pts = [(0, {"mean": 0.0, "low": 0.0, "high": 0.0})] + [q for q in pts if q[0] > 0]
            if len(pts) > (1 if protocol == "mixed" else 0):
                series[m] = pts
        vals = [v for pts in series.values() for _, d in pts for v in (d["mean"], d["low"], d["high"]) if v is not None] + [0.0]
        lo, hi = min(vals), max(vals)
        pad = max(0.01, 0.08 * (hi - lo))
        lo, hi = lo - pad, hi + pad
        nmax = max([n for pts in series.values() for n, _ in pts] + [1])
        X = lambda n: x0 + (x1 - x0) * n / nmax  # noqa: E731
        Y = lambda v: y1 - (y1 - y0) * (v - lo) / (hi - lo)  # noqa: E731
        draw.rectangle([x0, y0, x1, y1], outline="black")
        step = _nice_step(hi - lo)
        v = math.ceil(lo / step) * step
        while v <= hi:
            draw.line([x0 - 4, Y(v), x0, Y(v)], fill="black")
            draw.line([x0, Y(v), x1, Y(v)], fill=(235, 235, 235))
            draw.text((x0 - 8, Y(v)), f"{v:+.{max(0, -math.floor(math.log10(step)))}f}", fill="black", font=small, anchor="rm")
            v += step
        draw.line([x0, Y(0), x1, Y(0)], fill=(120, 120, 120), width=1)
        for n in sorted({n for pts in series.values() for n, _ in pts}):
            draw.line([X(n), y1, X(n), y1 + 4], fill="black")
            draw.text((X(n), y1 + 6), str(n), fill="black", font=small, anchor="ma")
        draw.text(((x0 + x1) / 2, y1 + 24), "n synthetic samples per defect type", fill="black", font=small, anchor="ma")
        band = Image.new("RGBA", img.size, (0, 0, 0, 0))
        bd = ImageDraw.Draw(band)
        for m, pts in series.items():
            c = COLOURS.get(m, (0, 0, 0))
            ok = [(n, d) for n, d in pts if d["low"] is not None and d["high"] is not None]
            if len(ok) > 1:
                poly = [(X(n), Y(d["high"])) for n, d in ok] + [(X(n), Y(d["low"])) for n, d in reversed(ok)]
                bd.polygon(poly, fill=(*c, 45))
            elif len(ok) == 1:
                n, d = ok[0]
                bd.line([X(n), Y(d["low"]), X(n), Y(d["high"])], fill=(*c, 110), width=6)
        img.paste(Image.alpha_composite(img.convert("RGBA"), band).convert("RGB"))
        draw = ImageDraw.Draw(img)
        for m, pts in series.items():
            c = COLOURS.get(m, (0, 0, 0))
            xy = [(X(n), Y(d["mean"])) for n, d in pts]
            if len(xy) > 1:
                draw.line(xy, fill=c, width=2)
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
    lx = 10
    for m in methods:
        c = COLOURS.get(m, (0, 0, 0))
        draw.line([lx, img.height - 20, lx + 24, img.height - 20], fill=c, width=3)
        draw.text((lx + 30, img.height - 20), m, fill="black", font=small, anchor="lm")
        lx += 40 + int(draw.textlength(m, font=small)) + 20
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def _nice_step(span: float) -> float:
    raw = span / 6
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)


# ------------------------------------------------------------------ table
def _ci(d: dict | None, nd: int = 3) -> str:
    if not d or d.get("mean") is None:
        return "-"
    if d.get("low") is None:
        return f"{d['mean']:+.{nd}f} [unbounded]"
    return f"{d['mean']:+.{nd}f} [{d['low']:+.{nd}f}, {d['high']:+.{nd}f}]"


def _abs(d: dict | None) -> str:
    if not d or d.get("mean") is None:
        return "-"
    return f"{d['mean']:.3f}" + (f" [{d['low']:.3f}, {d['high']:.3f}]" if d.get("low") is not None else "")


def markdown(entries: dict, results: dict, a, p, protocols: list[str], pngs: dict, pool_keys: set, setup: str) -> str:
    det = p.detector
    seeds = sorted({s for e in entries.values() for s in e["seeds"]}) or a.seeds
    lines = [
        "# Dose-response on Magnetic Tile: does more synthetic data help the detector?",
        "",
        "Made on a 2-core CPU (no GPU) by " + ", then ".join(f"`{c}`" for c in results.get("commands", [])[-3:]) + f". Numbers: `{_shown(a.results)}`.",
        "",
        f"- Generator backbone of the diffusion methods: {BACKBONE}; pretrain {p.pretrain.steps} steps, fine-tune "
        f"{p.finetune.steps} steps per defect type" + (f" (given: `{a.finetune_dir}`)" if a.finetune_dir else "") + f"; {a.ddim_steps} DDIM steps, "
        f"generate.batch_size {p.generate.batch_size}. The model-free methods need no model.",
        "- Per class: the library's split restricted to that defect type and the defect-free images (trained on its real training "
        "defects and normals, tested on its held-out defects and every held-out normal).",
        f"- Pool: generated once per (class, method) at the largest n; the n samples are the first n of one fixed order "
        f"(sha256 of order seed {a.order_seed} and sample id) among the samples that {'pass the per-sample quality gates' if a.filter == 'qc_pass' else 'were generated'}, "
        "so every smaller set is inside every larger one.",
        f"- Detector: the library's stage, U-Net {det.base_channels} base channels, depth {det.depth}, {det.norm} norm, images scaled by {det.scale}, "
        f"{det.patch or det.size} px patches, batch {det.batch_size}, Adam lr {det.lr}; budget **{det.budget}** "
        + (f"({det.epochs} passes over each run's own training union)" if det.budget == "epochs" else f"({det.epochs} epochs x ceil(n_real / batch) steps for every run)")
        + f"; seeds {seeds} paired (same initial weights and real-image order per seed).",
        "- Protocols: **mixed** = real + synthetic defects + normals, Δ against real-only (n = 0); **synthetic** = synthetic defects + "
        "normals only, Δ against copy-paste's subset at the same n. Δ = mean paired difference over seeds with its 95 % t-interval; "
        "*helps* / *hurts* when the interval lies above / below 0.",
        "",
    ]
    for cls in a.classes:
        mine = [e for e in entries.values() if e["class"] == cls]
        if not mine:
            continue
        lines += [f"## {cls}", ""]
        if cls in pngs:
            lines += [f"![{cls}]({pngs[cls].name})", ""]
        for protocol in protocols:
            rows = sorted((e for e in mine if e["protocol"] == protocol), key=lambda e: (e["method"] != BASELINE, e["method"], e["n"]))
            if not rows:
                continue
            lrn = {(f"n = {e['n']}: " if protocol == "synthetic" else "") + e["learned"]["reason"] for e in rows
                   if e.get("learned") and (protocol == "synthetic" and e["method"] == e.get("reference") or e["method"] == BASELINE)}
            lines += [f"### {protocol} (budget {det.budget})", ""]
            lines += [f"Sanity (reference detector learned?): " + "; ".join(sorted(x for x in lrn if x)), ""] if lrn else []
            lines += ["| method | n | n used | Δ pixel AP [95 % CI] | verdict | Δ AUPRO [95 % CI] | verdict | pixel AP | AUPRO | image AUROC | steps |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for e in rows:
                dp, da = e["delta"].get("pixel_ap"), e["delta"].get("aupro")
                is_ref = e["method"] == BASELINE or e["method"] == e.get("reference")
                lines.append(f"| {e['method']}{' (reference)' if is_ref else ''} | {e['n']} | {e['n_used']} | {'0' if is_ref else _ci(dp)} | "
                             f"{'' if is_ref else (dp or {}).get('verdict', '-')} | {'0' if is_ref else _ci(da)} | {'' if is_ref else (da or {}).get('verdict', '-')} | "
                             f"{_abs(e['absolute'].get('pixel_ap'))} | {_abs(e['absolute'].get('aupro'))} | {_abs(e['absolute'].get('image_auroc'))} | {e.get('steps') or '-'} |")
            lines.append("")
    lines += ["## Wall time", "", "Pools (seconds; one per class and method, at the largest n):", "",
              "| class | method | samples | usable | generate | refine | quality | gate pass rate | C2ST acc. (real vs real) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for k, r in sorted(results["pools"].items(), key=lambda kv: (kv[1]["class"], kv[1]["method"])):
        if k in pool_keys:
            c2 = r.get("c2st_accuracy")
            lines.append(f"| {r['class']} | {r['method']} | {r['size']} | {r['usable']} | {r.get('generate_s', '-')} | {r.get('refine_s', '-')} | "
                         f"{r.get('quality_s', '-')} | {r.get('pass_rate', '-')} | {'-' if c2 is None else f'{c2:.3f}'} ({r.get('c2st_real_vs_real') if r.get('c2st_real_vs_real') is not None else '-'}) |")
    lines += ["", "Detector runs (seconds; one stage run per class, n and protocol: every method at that n plus the reference, all seeds):", "",
              "| class | n | protocol | methods | runs (run x seed) | steps per run | seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
    total = 0.0
    for u in sorted(results["units"].values(), key=lambda u: (u["class"], u["n"], u["protocol"])):
        if u.get("setup") == setup and u["class"] in a.classes and set(u["pools"].values()) <= pool_keys:
            total += u["seconds"]
            lines.append(f"| {u['class']} | {u['n']} | {u['protocol']} | {', '.join(u['methods']) or '-'} | {u['runs']} | "
                         f"{', '.join(f'{k} {v}' for k, v in sorted(u['steps'].items()))} | {u['seconds']} |")
    lines += ["", f"Detector total: {total:.0f} s ({total / 3600:.2f} h). Data and models (ingest, split, pretrain, fine-tune; "
              f"0 when reused) per command: {results.get('models_s', [])} s. Setup key `{setup}`.", ""]
    return "\n".join(lines)


def _shown(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


if __name__ == "__main__":
    try:
        main()
    except DefectforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

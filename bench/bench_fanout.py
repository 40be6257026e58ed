"""Generation shard throughput on Dask: 1 worker vs 2 workers (LocalCluster, processes).

    .venv/bin/python bench/bench_fanout.py --method copy-paste --n-per-defect 32
    .venv/bin/python bench/bench_fanout.py --method inversion --checkpoints data/checkpoints ...

Makes the built-in sample in a temp dir, ingests and splits it, then generates the same
plan with workers=1 and workers=2 (each timed from cluster start to validated
manifest) and checks both manifests are identical. Writes bench/results/fanout-<method>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from defectforge.manifest.io import read_manifest  # noqa: E402
from defectforge.params.data import DataParams
from defectforge.params.generate import GenerateParams
from defectforge.params.sample import SampleParams
from defectforge.params.split import SplitParams
from defectforge.pipeline.generate import run as run_generate  # noqa: E402
from defectforge.pipeline.ingest import run as run_ingest  # noqa: E402
from defectforge.pipeline.sample import run as run_sample  # noqa: E402
from defectforge.pipeline.split import run as run_split  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="copy-paste")
    ap.add_argument("--n-per-defect", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--extra", default="{}", help="JSON of extra generate params (e.g. method sections)")
    ap.add_argument("--split", default=None, help="an existing split manifest (default: make the built-in sample)")
    ap.add_argument("--checkpoints", default=None, help="the finetune stage's folder (needed by inversion / blended)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.split:
            split = Path(a.split)
        else:
            root = run_sample(SampleParams(), tmp / "sample")
            source = run_ingest(DataParams(root=str(root)), tmp / "source.parquet", progress=False)
            split = run_split(SplitParams(), source, tmp / "split.parquet")
        results = {}
        rows = {}
        for workers in (1, 2):
            p = GenerateParams.model_validate(
                {"methods": [a.method], "n_per_defect": a.n_per_defect, "shard_size": a.shard_size, "workers": workers, **json.loads(a.extra)}
            )
            if workers == 1:
                p = p.model_copy(update={"scheduler": ""})
            t0 = time.perf_counter()
            out = run_generate(p, split, tmp / f"gen{workers}", checkpoints=a.checkpoints, progress=False) if workers > 1 else _single(p, split, tmp / "gen1", a.checkpoints)
            dt = time.perf_counter() - t0
            df = read_manifest(out).to_pandas().sort_values("sample_id")
            rows[workers] = list(zip(df.sample_id, df.image_sha256))
            results[f"workers_{workers}"] = {"seconds": round(dt, 2), "samples": len(df), "samples_per_s": round(len(df) / dt, 3)}
        results["speedup_2_over_1"] = round(results["workers_2"]["samples_per_s"] / results["workers_1"]["samples_per_s"], 3)
        results["identical_manifests"] = rows[1] == rows[2]
        results["method"] = a.method
        results["cpu_count"] = os.cpu_count()
    out = Path(__file__).parent / "results" / f"fanout-{a.method}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _single(p: GenerateParams, split: Path, out: Path, checkpoints: str | None) -> Path:
    """workers=1 through Dask too (a one-worker LocalCluster), so both runs pay the same overhead."""
    from defectforge.manifest.validate import check_manifest
    from defectforge.pipeline.fanout import run_on_dask
    from defectforge.manifest.io import read_manifest
    from defectforge.pipeline.generate import plan_method, prepare_output, run_plan

    plan = plan_method(p, p.methods[0], read_manifest(split).to_pandas(), checkpoints)
    n = prepare_output(split, out / plan.name, plan)
    run_on_dask(run_plan, (plan, str(split), str(out)), n, workers=1, progress=False)
    check_manifest(out)
    return out


if __name__ == "__main__":
    main()

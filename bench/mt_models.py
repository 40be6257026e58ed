"""Magnetic Tile models for the benchmarks, trained through the library's own stages.

    .venv/bin/python bench/mt_models.py --work /tmp/mt [--finetune-tag NAME] [--finetune-steps N]

ingest -> split (the library's split: AnomalyDiffusion's lowest third of sorted ids per
defect type trains the generator; ``good_test_fraction`` of MT_Free is held out for the
detector's test) -> pretrain -> finetune, exactly the functions the DVC stages call, so
the base model sees only the split's defect-free *training* images (no leak into the
detector's test set).

Reuse: each output lives in a folder named by the hash of what determines it (the
split manifest's bytes and the stage's params), as DVC's run cache would key it; a rerun
with the same inputs reuses it, a changed split or param trains anew.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from defectforge.params.file import parse_params
from defectforge.pipeline.finetune import run as run_finetune  # noqa: E402
from defectforge.pipeline.pretrain import run as run_pretrain  # noqa: E402
from defectforge.pipeline.ingest import run as run_ingest  # noqa: E402
from defectforge.pipeline.split import run as run_split  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFECTS = ["blowhole", "crack", "break"]


def mt_params(root: str, *, pretrain_steps: int = 800, finetune_steps: int = 250, finetune: dict | None = None, extra: dict | None = None):
    """params.yaml with the Magnetic Tile overrides every MT bench shares."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["data"].update(layout="magnetic-tile", root=root, defect_types=DEFECTS)
    data["pretrain"].update(steps=pretrain_steps, lr=6e-4)
    data["finetune"].update(steps=finetune_steps, **(finetune or {}))
    data["release"].update(name="magnetic-tile")
    for section, values in (extra or {}).items():
        data[section].update(values)
    return parse_params(data, "bench params")


def _key(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]


def build(work: Path, p, *, finetune_tag: str = "", finetune_dir: str | Path | None = None, log=print) -> dict[str, Path]:
    """ingest, split, pretrain, finetune under ``work``; returns the paths.

    ``finetune_dir``: use these checkpoints as they are (e.g. a run made before a params
    field was added, whose key would differ now)."""
    work.mkdir(parents=True, exist_ok=True)
    source, split = work / "source.parquet", work / "split.parquet"
    if not source.exists():
        run_ingest(p.data, source)
    if not split.exists():
        run_split(p.split, source, split)
    split_sha = hashlib.sha256(split.read_bytes()).hexdigest()
    base = work / "models" / f"base-{_key(split_sha, p.pretrain.model_dump(mode='json'))}"
    if not (base / "base.json").exists():
        t = time.perf_counter()
        run_pretrain(p.pretrain, split, base, needed=["inversion"])
        log(f"[pretrain] {time.perf_counter() - t:.0f} s -> {base}")
    else:
        log(f"[pretrain] reused {base}")
    # keyed on the params that differ from the defaults, so a new field with a default keeps old keys valid
    ft = work / "models" / f"finetune-{finetune_tag or 'default'}-{_key(split_sha, base.name, p.finetune.model_dump(mode='json', exclude_defaults=True))}"
    if finetune_dir is not None:
        ft = Path(finetune_dir)
        if not (ft / "checkpoints.json").exists():
            raise SystemExit(f"{ft}: no checkpoints.json (not a finetune stage output)")
        log(f"[finetune] given {ft}")
    elif not (ft / "checkpoints.json").exists():
        t = time.perf_counter()
        run_finetune(p.finetune, split, base, ft, needed=["inversion"])
        log(f"[finetune] {time.perf_counter() - t:.0f} s -> {ft}")
    else:
        log(f"[finetune] reused {ft}")
    return {"source": source, "split": split, "base": base, "finetune": ft}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=str(ROOT.parent / "shared/data/magnetic-tile"))
    ap.add_argument("--work", default="/tmp/mt")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--finetune-steps", type=int, default=250)
    ap.add_argument("--finetune-tag", default="")
    ap.add_argument("--finetune-json", default="{}", help="extra finetune params, e.g. '{\"lr\": 0.0003}'")
    a = ap.parse_args()
    torch.set_num_threads(1)
    p = mt_params(a.root, pretrain_steps=a.pretrain_steps, finetune_steps=a.finetune_steps, finetune=json.loads(a.finetune_json))
    paths = build(Path(a.work), p, finetune_tag=a.finetune_tag)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()

"""The consumer side installs little: ``defectforge.load`` and ``ManifestDataset`` import and
read a release with only pyarrow, pillow and numpy (torch only for ``ManifestDataset``'s items).

Each check runs in a fresh interpreter whose import system refuses the factory's packages
(a ``sys.meta_path`` finder raising ImportError), so a top-level import of any of them on
the consumer's path fails the test even though this venv has them all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from defectforge.data.files import sha256_file, write_png
from defectforge.manifest.io import write_manifest

SRC = Path(__file__).resolve().parents[2] / "src"

# what `pip install defectforge[factory]` adds; none of it may be needed to read a release
FACTORY = ["prefect", "dvc", "great_expectations", "diffusers", "transformers", "peft", "accelerate", "torchvision",
           "torchmetrics", "torch_fidelity", "dask", "distributed", "pydantic", "yaml", "typer", "scipy", "skimage",
           "pandas", "safetensors", "tqdm"]

CHILD = r"""
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked for this test: {name}")
        return None

sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[2])
import defectforge
from defectforge import ManifestDataset

table = defectforge.load(name="sample", version=1, repo=sys.argv[3], filters={"defect_type": "crack"})
ds = ManifestDataset(table)
out = {"rows": table.num_rows, "first_bytes": len(ds.read_bytes(ds.rows[0]["image_path"]))}
if sys.argv[4] == "items":
    image, mask, row = ds[0]
    out["image"] = list(image.shape)
    out["mask_sum"] = int(mask.sum())
else:
    try:
        ds[0]
    except Exception as exc:  # without torch: one line saying what to install
        out["item_error"] = f"{type(exc).__name__}: {exc}"
out["loaded"] = sorted(m for m in BLOCKED if m in sys.modules)
print(json.dumps(out))
"""


def _release(base: Path) -> Path:
    """A working copy holding release v1 of 'sample': two crack rows and one hole row, files hashed."""
    proj = base / "proj"
    data = proj / "releases/sample/v1"
    data.mkdir(parents=True)
    (proj / "dvc.yaml").write_text("stages: {}\n")
    rows = []
    for i, defect in enumerate(["crack", "crack", "hole"]):
        write_png(data / f"img{i}.png", np.full((16, 16, 3), 60 + 40 * i, np.uint8))
        mask = np.zeros((16, 16), bool)
        mask[4:8, 4:8] = True
        write_png(data / f"img{i}_mask.png", mask)
        rows.append(dict(image_id=f"cat/{defect}/{i:03d}", category="cat", defect_type=defect, image_path=f"img{i}.png",
                         mask_path=f"img{i}_mask.png", width=16, height=16, image_sha256=sha256_file(data / f"img{i}.png"),
                         mask_sha256=sha256_file(data / f"img{i}_mask.png"), mask_area=16, origin="test"))
    write_manifest(rows, data / "manifest.parquet", kind="source", dataset_root=data)
    return proj


def _consume(proj: Path, blocked: list[str], mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(blocked), str(SRC), str(proj), mode],
                       capture_output=True, text=True, cwd=proj)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_load_reads_a_release_without_the_factory_or_torch(tmp_path):
    proj = _release(tmp_path)
    out = _consume(proj, FACTORY + ["torch"], "table")
    assert out["rows"] == 2 and out["first_bytes"] > 0  # the filter reached Parquet, a file was read and checked
    assert out["loaded"] == []
    assert out["item_error"].startswith("DefectforgeError") and "defectforge[dataset]" in out["item_error"]


def test_manifest_dataset_items_need_only_torch_beyond_the_base(tmp_path):
    proj = _release(tmp_path)
    out = _consume(proj, FACTORY, "items")
    assert out["image"] == [3, 16, 16] and out["mask_sum"] == 16
    assert out["loaded"] == []

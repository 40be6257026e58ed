import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from defectforge.data.files import sha256_file, write_png
from defectforge.errors import ManifestError
from defectforge.manifest.io import ShardedWriter, assemble, manifest_info, read_manifest, write_manifest
from defectforge.manifest.paths import check_relpath
from defectforge.manifest.schema import SCHEMA_VERSION
from defectforge.manifest.validate import check_manifest, validate_manifest


def _source_rows(root, n=3):
    rows = []
    for i in range(n):
        img = np.full((16, 16, 3), 40 * i, np.uint8)
        mask = np.zeros((16, 16), bool)
        mask[4:8, 4 : 5 + i] = True
        write_png(root / f"img{i}.png", img)
        write_png(root / f"img{i}_mask.png", mask)
        rows.append(
            dict(
                image_id=f"cat/crack/{i:03d}",
                category="cat",
                defect_type="crack" if i % 2 == 0 else "pit",
                image_path=f"img{i}.png",
                mask_path=f"img{i}_mask.png",
                width=16,
                height=16,
                image_sha256=sha256_file(root / f"img{i}.png"),
                mask_sha256=sha256_file(root / f"img{i}_mask.png"),
                mask_area=int(mask.sum()),
                origin="test",
            )
        )
    return rows


def test_schema_version_and_root_in_metadata(tmp_path):
    rows = _source_rows(tmp_path)
    out = write_manifest(rows, tmp_path / "m" / "source.parquet", kind="source", dataset_root=tmp_path)
    meta = pq.read_schema(out).metadata
    assert meta[b"defectforge.schema_version"].decode() == SCHEMA_VERSION
    info = manifest_info(out)
    assert info["kind"] == "source" and info["dataset_root"] == str(tmp_path.resolve())
    assert validate_manifest(out) == []


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "a/../../b.png", "C:/x.png"])
def test_path_escaping_root_rejected(tmp_path, bad):
    rows = _source_rows(tmp_path)
    rows[1]["image_path"] = bad
    with pytest.raises(ManifestError, match="escapes the dataset root"):
        write_manifest(rows, tmp_path / "source.parquet", kind="source", dataset_root=tmp_path)
    assert not (tmp_path / "source.parquet").exists()
    assert check_relpath("a/./b.png") == "a/b.png"


def test_reader_pushes_filters_down(tmp_path):
    rows = _source_rows(tmp_path, n=5)
    w = ShardedWriter(tmp_path / "shards", kind="source", dataset_root=tmp_path)
    w.write(0, rows[:3])
    w.write(1, rows[3:])
    t = read_manifest(tmp_path / "shards", filters={"defect_type": "pit"})
    assert sorted(t.column("image_id").to_pylist()) == ["cat/crack/001", "cat/crack/003"]
    t2 = read_manifest(tmp_path / "shards", filters={"defect_type": ["pit", "crack"]}, columns=["image_id"])
    assert t2.num_rows == 5 and t2.column_names == ["image_id"]
    with pytest.raises(ManifestError, match="unknown columns"):
        read_manifest(tmp_path / "shards", filters={"nope": 1})


def test_assemble_rejects_duplicates_and_missing_shards(tmp_path):
    rows = _source_rows(tmp_path, n=4)
    w = ShardedWriter(tmp_path / "shards", kind="source", dataset_root=tmp_path)
    w.write(0, rows[:2])
    with pytest.raises(ManifestError, match="2 expected"):
        assemble(w.dir, tmp_path / "all.parquet", kind="source", dataset_root=tmp_path, expected_shards=2)
    w.write(1, rows[1:])
    with pytest.raises(ManifestError, match="duplicate image_id"):
        assemble(w.dir, tmp_path / "all.parquet", kind="source", dataset_root=tmp_path)
    assert not (tmp_path / "all.parquet").exists()


_KILLED_WRITER = r"""
import os, sys
from defectforge.manifest.io import ShardedWriter
import pyarrow.parquet as pq
sys.path.insert(0, {testdir!r})
from test_manifest import _source_rows
from pathlib import Path
root = Path({root!r})
rows = _source_rows(root, n=6)
w = ShardedWriter(root / "shards", kind="source", dataset_root=root)
for i in range(3):
    if w.done(i):
        continue
    if i == {kill_at} and os.environ.get("KILL") == "1":
        # die in the middle of writing: a temporary file exists, the rename never happens
        import pyarrow as pa
        f = open(w.dir / ".part-{{:05d}}.parquet.123.tmp".format(i), "wb"); f.write(b"PAR1 torn"); f.close()
        os.kill(os.getpid(), 9)
    w.write(i, rows[2 * i : 2 * i + 2])
print("done")
"""


def test_killed_writer_leaves_no_torn_file_and_resume_does_not_duplicate(tmp_path):
    code = _KILLED_WRITER.format(testdir=os.path.dirname(__file__), root=str(tmp_path), kill_at=1)
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KILL": "1"}, capture_output=True, text=True)
    assert r.returncode == -9
    assert [p.name for p in sorted((tmp_path / "shards").glob("part-*"))] == ["part-00000.parquet"]
    assert read_manifest(tmp_path / "shards").num_rows == 2  # the torn temp file is not part of the manifest
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list((tmp_path / "shards").glob(".*.tmp"))
    ids = read_manifest(tmp_path / "shards").column("image_id").to_pylist()
    assert len(ids) == 6 and len(set(ids)) == 6


def test_gx_suite_catches_bad_rows(tmp_path):
    rows = _source_rows(tmp_path, n=4)
    rows[1]["image_id"] = rows[0]["image_id"]  # duplicate id
    rows[2]["mask_path"] = "missing_mask.png"  # file does not exist
    rows[3]["mask_area"] = 0  # empty mask
    rows[0]["width"] = 0  # size not positive
    write_png(tmp_path / "whole_mask.png", np.ones((16, 16), bool))
    extra = dict(rows[0], image_id="cat/crack/whole", mask_path="whole_mask.png", mask_area=256, width=16)
    rows.append(extra)  # mask covers the whole image
    rows.append(dict(rows[0], image_id="cat/good/x", defect_type="good", mask_path=None, mask_sha256=None, mask_area=0, width=16))
    out = write_manifest(rows, tmp_path / "bad.parquet", kind="source", dataset_root=tmp_path)
    failures = validate_manifest(out)
    text = "\n".join(failures)
    assert "image_id" in text and "unique" in text
    assert "mask_path" in text and "missing_mask.png" in text
    assert "mask_fraction" in text  # both the empty and the whole-image mask
    assert "width" in text
    assert "cat/good/x" not in text  # a good image needs no mask
    with pytest.raises(ManifestError, match="expectation"):
        check_manifest(out)


@pytest.mark.parametrize("value, stored", [("wide", "string"), (219.5, "double")])
def test_a_column_of_the_wrong_type_is_one_line_naming_file_and_column(tmp_path, value, stored):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from defectforge.errors import ManifestError
    from defectforge.manifest.io import read_manifest, write_manifest

    rows = [{"image_id": f"c/crack/{i}", "category": "c", "defect_type": "crack", "image_path": f"c/{i}.png", "mask_path": None,
             "image_sha256": "0" * 64, "mask_sha256": None, "width": 8, "height": 8, "mask_area": 0, "origin": "real"} for i in range(3)]
    good = tmp_path / "good.parquet"
    write_manifest(rows, good, kind="source", dataset_root=tmp_path)
    t = pq.read_table(good)
    i = t.schema.get_field_index("width")
    col = pa.array([value] * len(t))
    bad = tmp_path / "bad.parquet"
    pq.write_table(t.set_column(i, pa.field("width", col.type), col).replace_schema_metadata(t.schema.metadata), bad)
    with pytest.raises(ManifestError) as err:
        read_manifest(bad)
    msg = str(err.value)
    assert "\n" not in msg and str(bad) in msg and f"column 'width' is stored as {stored}" in msg

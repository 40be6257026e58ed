"""Safe with users' files (issue 10): generate and refine never delete or overwrite what
defectforge did not make, refuse outputs that are not regular files or folders, write
with the umask's permissions, regenerate when a source image changed, and never name a
deleted temporary file in an error."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from defectforge.data.codec import encode_png, read_image
from defectforge.data.files import OWNED, atomic_write_bytes, check_output_file, claim_dir
from defectforge.errors import DataError, DefectforgeError, ManifestError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.validate import write_checked
from defectforge.params.data import DataParams
from defectforge.params.generate import GenerateParams
from defectforge.params.refine import RefineParams
from defectforge.params.split import SplitParams
from defectforge.pipeline.generate import run as run_generate
from defectforge.pipeline.ingest import run as run_ingest
from defectforge.pipeline.refine import run as run_refine
from defectforge.pipeline.split import run as run_split

P = GenerateParams(n_per_defect=1, shard_size=2, seed=0)


def _users_folder(path: Path) -> dict[Path, bytes]:
    (path / "mydocs" / "sub").mkdir(parents=True)
    files = {path / "mydocs" / "sub" / "thesis.txt": b"four years of work\n", path / "notes.txt": b"keep me\n"}
    for f, data in files.items():
        f.write_bytes(data)
    return files


def _bad_split(split, tmp_path) -> Path:
    """A split manifest whose category 'brick' has no defect-free training image."""
    df = read_manifest(split).to_pandas()
    df = df[~((df.category == "brick") & (df.defect_type == "good"))]
    return write_manifest(df, tmp_path / "bad-split.parquet", kind="split", dataset_root=manifest_info(split)["dataset_root"])


def _own_dataset(sample_root, tmp_path) -> tuple[Path, Path, Path]:
    """A private copy of the sample (root, source manifest, split manifest) a test may change."""
    root = tmp_path / "data"
    shutil.copytree(sample_root, root)
    return root, *_ingest(root, tmp_path / "m")


def _ingest(root: Path, out: Path) -> tuple[Path, Path]:
    source = run_ingest(DataParams(layout="mvtec", root=str(root)), out / "source.parquet", progress=False)
    return source, run_split(SplitParams(), source, out / "split.parquet")


# --- 1. folders that are not ours are never taken over ------------------------------


@pytest.mark.parametrize("split_kind", ["good", "bad"])
def test_generate_refuses_a_users_folder_before_touching_it(sample_manifests, tmp_path, split_kind):
    _, split = sample_manifests
    if split_kind == "bad":
        split = _bad_split(split, tmp_path)
    out = tmp_path / "out"
    files = _users_folder(out)
    with pytest.raises(DataError, match="not made by defectforge") as err:
        run_generate(P, split, out, progress=False)
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    assert {f: f.read_bytes() for f in files} == files
    assert sorted(p.name for p in out.iterdir()) == ["mydocs", "notes.txt"]  # no marker, no method folder


def test_a_users_folder_holding_an_old_method_folder_is_still_theirs(sample_manifests, tmp_path):
    """A folder with one old generate method folder (it has a plan) beside the user's files
    is not a defectforge output root: it would be marked and later replaced as a whole."""
    _, split = sample_manifests
    run_generate(P, split, tmp_path / "old", progress=False)
    out = tmp_path / "out"
    files = _users_folder(out)
    shutil.copytree(tmp_path / "old" / "copy-paste", out / "copy-paste")
    with pytest.raises(DataError, match="not made by defectforge"):
        run_generate(P, split, out, progress=False)
    assert {f: f.read_bytes() for f in files} == files and not (out / OWNED).exists()


def test_generate_into_a_copy_of_a_magnetic_tile_root_is_refused(sample_manifests, tmp_path):
    _, split = sample_manifests
    out = tmp_path / "magnetic-tile-copy"
    for cls in ("MT_Crack", "MT_Free"):
        (out / cls / "Imgs").mkdir(parents=True)
        (out / cls / "Imgs" / "exp1_num_1.jpg").write_bytes(b"jpeg bytes")
    with pytest.raises(DataError, match="not made by defectforge"):
        run_generate(P, split, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["MT_Crack", "MT_Free"]
    assert (out / "MT_Crack" / "Imgs" / "exp1_num_1.jpg").read_bytes() == b"jpeg bytes"


def test_a_folder_made_as_something_else_is_not_taken_over(sample_root, sample_manifests, tmp_path):
    """A copy of the built-in sample carries the marker of a *sample folder*: refine must not
    replace it and generate must not add method folders to it."""
    split = sample_manifests[1]
    gen = run_generate(P, split, tmp_path / "gen", progress=False)
    copy = tmp_path / "sample-copy"
    shutil.copytree(sample_root, copy)
    before = sorted(str(p.relative_to(copy)) for p in copy.rglob("*"))
    with pytest.raises(DataError, match="made as a sample folder"):
        run_refine(RefineParams(), split, gen, copy)
    with pytest.raises(DataError, match="made as a sample folder"):
        run_generate(P, split, copy, progress=False)
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*")) == before


def test_output_overlapping_the_dataset_root_is_refused(sample_root, tmp_path):
    root, _, split = _own_dataset(sample_root, tmp_path)
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    with pytest.raises(DataError, match="overlaps the input folder"):
        run_generate(P, split, root / "generated", progress=False)  # inside the dataset root
    link = tmp_path / "link"
    link.symlink_to(root)  # the same, through a symlinked parent
    with pytest.raises(DataError, match="overlaps the input folder"):
        run_generate(P, split, link / "generated", progress=False)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


def test_a_symlinked_output_folder_is_refused(sample_manifests, tmp_path):
    _, split = sample_manifests
    target = tmp_path / "elsewhere"
    files = _users_folder(target)
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(DataError, match="symlink"):
        run_generate(P, split, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="symlink"):
        claim_dir(tmp_path / "out")
    assert {f: f.read_bytes() for f in files} == files


def test_refine_never_replaces_the_generated_folder_it_reads(sample_manifests, tmp_path):
    _, split = sample_manifests
    gen = run_generate(P, split, tmp_path / "gen", progress=False)
    images = sorted(gen.rglob("*.png"))
    with pytest.raises(DataError, match="overlaps the input folder"):
        run_refine(RefineParams(), split, gen, gen)
    with pytest.raises(DataError, match="overlaps the input folder"):
        run_refine(RefineParams(), split, gen, gen / "refined")
    assert sorted(gen.rglob("*.png")) == images and images


def test_split_manifest_passed_as_generated_is_one_clear_line(sample_manifests, tmp_path):
    source, split = sample_manifests
    with pytest.raises(DataError, match="is a split manifest; refine needs the generate stage"):
        run_refine(RefineParams(), split, split, tmp_path / "ref")
    with pytest.raises(DataError, match="is a source manifest; generate needs the split stage"):
        run_generate(P, source, tmp_path / "gen", progress=False)
    assert not (tmp_path / "gen").exists() and not (tmp_path / "ref").exists()


# --- 2. outputs that are not regular files ------------------------------------------


def test_fifo_and_device_outputs_are_refused(sample_manifests, tmp_path):
    source, split = sample_manifests
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    with pytest.raises(DefectforgeError, match="not a regular file"):
        write_checked(read_manifest(split).to_pandas(), fifo, kind="split", dataset_root=manifest_info(split)["dataset_root"])
    with pytest.raises(DataError, match="not a regular file"):
        atomic_write_bytes(fifo, b"{}")  # every stage's JSON/PNG writer
    with pytest.raises(DataError, match="not a directory"):
        run_generate(P, split, fifo, progress=False)
    gen = run_generate(P, split, tmp_path / "gen", progress=False)
    with pytest.raises(DataError, match="not a directory"):
        run_refine(RefineParams(), split, gen, fifo)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if os.path.exists("/dev/full"):  # only checkers that write nothing: a regression must not replace the node
        with pytest.raises(DataError, match="not a regular file"):
            check_output_file("/dev/full")
        with pytest.raises(DataError, match="not a directory"):
            claim_dir("/dev/full")
        assert stat.S_ISCHR(os.lstat("/dev/full").st_mode)


# --- 4. a changed source is generated again ------------------------------------------


def _replace_same_size(path: Path) -> None:
    img = read_image(path)
    path.write_bytes(encode_png(np.ascontiguousarray(255 - img[::-1])))  # other pixels, same size


def test_a_replaced_source_image_is_generated_again(sample_root, tmp_path):
    root, _, split = _own_dataset(sample_root, tmp_path)
    out = tmp_path / "gen"
    before = read_manifest(run_generate(P, split, out, progress=False)).to_pandas().set_index("source_image_id")
    normal = before.index[0]
    path = root / read_manifest(split).to_pandas().set_index("image_id").loc[normal, "image_path"]
    _replace_same_size(path)
    _, split = _ingest(root, tmp_path / "m")  # the pipeline re-ingests a changed dataset
    after = read_manifest(run_generate(P, split, out, progress=False)).to_pandas().set_index("source_image_id")
    old, new = before.loc[[normal]], after.loc[[normal]]
    assert (new.source_sha256 != old.source_sha256.iloc[0]).all()
    assert set(new.image_sha256).isdisjoint(old.image_sha256)
    from defectforge.data.files import sha256_file

    assert (new.source_sha256 == sha256_file(path)).all()


def test_a_source_changed_after_ingest_is_refused(sample_root, tmp_path):
    root, _, split = _own_dataset(sample_root, tmp_path)
    df = read_manifest(split).to_pandas()
    normal = df[(df.split == "train") & (df.defect_type == "good")].image_path.iloc[0]
    for rel in df[(df.split == "train") & (df.defect_type == "good")].image_path:
        _replace_same_size(root / rel)  # every normal, so whichever the plan picks
    with pytest.raises(DataError, match="changed since ingest") as err:
        run_generate(P, split, tmp_path / "gen", progress=False)
    assert str(root) in str(err.value) and str(normal).split("/")[0] in str(err.value)


# --- 5. permissions follow the umask ------------------------------------------------


def test_images_and_manifests_follow_the_umask(sample_manifests, tmp_path):
    _, split = sample_manifests
    old = os.umask(0o027)
    try:
        gen = run_generate(P, split, tmp_path / "gen", progress=False)
        ref = run_refine(RefineParams(), split, gen, tmp_path / "ref")
    finally:
        os.umask(old)
    files = [p for d in (gen, ref.parent) for p in d.rglob("*") if p.is_file()]
    assert any(p.suffix == ".png" for p in files) and any(p.name.startswith("part-") for p in files) and ref in files
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {oct(m) for m in modes.values()} == {"0o640"}, {str(p): oct(m) for p, m in modes.items() if m != 0o640}
    dirs = {oct(stat.S_IMODE(p.stat().st_mode)) for d in (gen, ref.parent) for p in [d, *d.rglob("*")] if p.is_dir()}
    assert dirs == {"0o750"}


# --- 6. errors never name a temporary file ------------------------------------------


def test_errors_name_the_output_not_a_deleted_temporary(sample_manifests, tmp_path):
    source, _ = sample_manifests
    df = read_manifest(source).to_pandas()
    df.loc[0, "image_path"] = "brick/missing.png"  # fails the suite's file-exists expectation
    folder = tmp_path / "two  spaces"  # the error line collapses whitespace: the temp path no longer matches verbatim
    folder.mkdir()
    users = folder / ".source.parquet.unchecked"  # a user's file with the old fixed temporary name
    users.write_bytes(b"mine")
    out = folder / "source.parquet"
    with pytest.raises(ManifestError) as err:
        write_checked(df, out, kind="source", dataset_root=manifest_info(source)["dataset_root"])
    msg = str(err.value)
    assert "unchecked" not in msg and ".tmp" not in msg and "source.parquet" in msg
    assert sorted(p.name for p in folder.iterdir()) == [".source.parquet.unchecked"] and users.read_bytes() == b"mine"
    (tmp_path / "notes.txt").write_text("x")  # a file where a folder is expected: one line, not a traceback
    with pytest.raises(ManifestError, match="notes.txt/source.parquet: cannot write"):
        write_checked(df, tmp_path / "notes.txt" / "source.parquet", kind="source", dataset_root=folder)


def test_a_bad_split_creates_nothing(sample_manifests, tmp_path):
    _, split = sample_manifests
    with pytest.raises(DataError, match="no defect-free training images"):
        run_generate(P, _bad_split(split, tmp_path), tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()

"""The generate driver with the copy-paste baseline: determinism, resume after a kill, bad input."""

import os
import subprocess
import sys

import numpy as np
import pytest

from defectforge.data.codec import read_image, read_mask
from defectforge.errors import DataError
from defectforge.manifest.io import read_manifest
from defectforge.manifest.validate import validate_manifest
from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate

P = GenerateParams(n_per_defect=3, shard_size=2, seed=0)


def _rows(manifest_dir):
    df = read_manifest(manifest_dir).to_pandas().sort_values("sample_id")
    return list(zip(df.sample_id, df.image_sha256, df.mask_sha256))


def test_copy_paste_generates_a_valid_manifest(sample_manifests, tmp_path):
    _, split = sample_manifests
    out = run_generate(P, split, tmp_path / "gen", progress=False)
    df = read_manifest(out).to_pandas()
    assert len(df) == 4 * 3
    assert validate_manifest(out) == []
    splitdf = read_manifest(split).to_pandas().set_index("image_id")
    # normals come from defect-free *training* images only
    assert (splitdf.loc[df.source_image_id, "split"] == "train").all()
    assert (splitdf.loc[df.source_image_id, "defect_type"] == "good").all()
    for r in df.itertuples():
        img = read_image(tmp_path / "gen" / r.image_path)
        mask = read_mask(tmp_path / "gen" / r.mask_path)
        assert img.shape == (r.height, r.width, 3) and mask.sum() == r.mask_area > 0
    assert df.params_sha256.nunique() == 1 and df.method_config.nunique() == 1


def test_pixels_change_only_near_the_mask(sample_manifests, sample_root, tmp_path):
    from scipy import ndimage

    _, split = sample_manifests
    out = run_generate(P, split, tmp_path / "gen", progress=False)
    src = read_manifest(split).to_pandas().set_index("image_id")
    for r in read_manifest(out).to_pandas().itertuples():
        normal = read_image(sample_root / src.loc[r.source_image_id, "image_path"])
        img = read_image(tmp_path / "gen" / r.image_path)
        mask = read_mask(tmp_path / "gen" / r.mask_path)
        near = ndimage.binary_dilation(mask, iterations=8)
        assert np.array_equal(img[~near], normal[~near])
        assert (img[mask] != normal[mask]).any()


def test_same_seed_same_dataset_other_seed_other_dataset(sample_manifests, tmp_path):
    _, split = sample_manifests
    a = _rows(run_generate(P, split, tmp_path / "a", progress=False))
    b = _rows(run_generate(P, split, tmp_path / "b", progress=False))
    c = _rows(run_generate(GenerateParams(n_per_defect=3, shard_size=2, seed=1), split, tmp_path / "c", progress=False))
    assert a == b
    assert {x[1] for x in a}.isdisjoint({x[1] for x in c})


def _killed_after(shards: int) -> str:
    """Code that makes the process die (as ``kill -9`` would) right after its ``shards``-th committed shard."""
    return (
        "import os\n"
        "from defectforge.manifest.io import ShardedWriter\n"
        "_write, _done = ShardedWriter.write, []\n"
        "def _write_then_die(self, *a, **k):\n"
        "    out = _write(self, *a, **k)\n"
        "    _done.append(1)\n"
        f"    if len(_done) >= {shards}:\n"
        "        os._exit(137)\n"
        "    return out\n"
        "ShardedWriter.write = _write_then_die\n"
    )


def test_killed_generation_resumes_without_duplicates(sample_manifests, tmp_path):
    _, split = sample_manifests
    code = (
        "from defectforge.params.generate import GenerateParams; from defectforge.pipeline.generate import run as run_generate; "
        f"run_generate(GenerateParams(n_per_defect=3, shard_size=2), {str(split)!r}, {str(tmp_path / 'gen')!r}, progress=False)"
    )
    r = subprocess.run([sys.executable, "-c", _killed_after(2) + code], capture_output=True, text=True)
    assert r.returncode == 137, r.stderr
    assert len(list((tmp_path / "gen/copy-paste/manifest").glob("part-*.parquet"))) == 2
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    resumed = _rows(tmp_path / "gen/copy-paste/manifest")
    clean = _rows(run_generate(P, split, tmp_path / "clean", progress=False))
    assert resumed == clean and len(resumed) == 12


def test_changed_params_do_not_reuse_old_shards(sample_manifests, tmp_path):
    _, split = sample_manifests
    run_generate(P, split, tmp_path / "gen", progress=False)
    other = GenerateParams(n_per_defect=2, shard_size=2, seed=5)
    rows = _rows(run_generate(other, split, tmp_path / "gen", progress=False))
    assert rows == _rows(run_generate(other, split, tmp_path / "fresh", progress=False))


def test_category_without_normals_is_a_clear_error(sample_manifests, tmp_path):
    from defectforge.manifest.io import write_manifest
    from defectforge.manifest.io import manifest_info

    _, split = sample_manifests
    df = read_manifest(split).to_pandas()
    df = df[~((df.category == "brick") & (df.defect_type == "good"))]
    bad = write_manifest(df, tmp_path / "split.parquet", kind="split", dataset_root=manifest_info(split)["dataset_root"])
    with pytest.raises(DataError, match="'brick' has no defect-free training images"):
        run_generate(P, bad, tmp_path / "gen", progress=False)


@pytest.mark.slow
def test_dask_local_cluster_two_workers_gives_the_same_manifest(sample_manifests, tmp_path):
    _, split = sample_manifests
    single = _rows(run_generate(P, split, tmp_path / "single", progress=False))
    dask_p = P.model_copy(update={"workers": 2})
    fanned = _rows(run_generate(dask_p, split, tmp_path / "dask", progress=False))
    assert fanned == single
    assert len(list((tmp_path / "dask/copy-paste/manifest").glob("part-*.parquet"))) == 6


def test_a_fan_out_worker_leaves_the_other_workers_temporaries_alone(sample_manifests, tmp_path):
    """The flaky two-worker test: every worker's writer deleted every ``.*.tmp`` in the shared
    manifest folder, including another worker's shard being written. Only the driver cleans."""
    from defectforge.manifest.io import read_manifest
    from defectforge.pipeline.generate import plan_method, prepare_output, run_method

    _, split = sample_manifests
    out = tmp_path / "gen"
    plan = plan_method(P, "copy-paste", read_manifest(split).to_pandas())
    n = prepare_output(split, out / "copy-paste", plan)
    in_flight = out / "copy-paste" / "manifest" / ".part-00001.parquet.x1y2.tmp"  # worker B, mid-write
    in_flight.write_bytes(b"partial")
    run_method(P, "copy-paste", split, out, shards=[0], progress=False)  # worker A
    assert in_flight.is_file() and n > 1
    prepare_output(split, out / "copy-paste", plan)  # the next run's driver
    assert not in_flight.exists()


def test_every_method_records_its_mask_origin_and_the_prior_places_masks_where_real_ones_sit(sample_manifests, tmp_path):
    from defectforge.masks.foreground import estimate_foreground
    from defectforge.masks.target import relative_position

    _, split = sample_manifests
    p = GenerateParams(methods=["copy-paste", "cutpaste", "perlin"], n_per_defect=3, shard_size=4, seed=0, target_placement="foreground")
    df = read_manifest(run_generate(p, split, tmp_path / "gen", progress=False)).to_pandas()
    origin = df.groupby("method").mask_origin.agg(lambda s: set(s))
    assert origin["copy-paste"] == {"augmented-real/foreground"}
    assert origin["cutpaste"] <= {"cutpaste-patch", "cutpaste-scar"} and origin["perlin"] == {"perlin-noise"}
    # prior placement: every target sits within a few box-percent of some real training defect's place
    prior = GenerateParams(methods=["copy-paste"], n_per_defect=6, seed=1, target_placement="prior")
    root = tmp_path / "prior"
    pf = read_manifest(run_generate(prior, split, root, progress=False)).to_pandas()
    assert set(pf.mask_origin) == {"augmented-real/prior"}
    sp = read_manifest(split).to_pandas()
    from defectforge.manifest.io import manifest_info

    src_root = manifest_info(split)["dataset_root"]
    for (cat, dt), rows in pf.groupby(["category", "defect_type"]):
        reals = sp[(sp.split == "train") & (sp.category == cat) & (sp.defect_type == dt)]
        real_pos = np.array([relative_position(read_mask(os.path.join(src_root, r.mask_path)),
                                               estimate_foreground(read_image(os.path.join(src_root, r.image_path)))) for r in reals.itertuples()])
        for r in rows.itertuples():
            raw = read_mask(root / r.raw_mask_path)
            pos = relative_position(raw, estimate_foreground(read_image(root / r.image_path)))
            # kernel width <= 5 % of the box; the shape's clipping at the border moves it a little more
            assert np.abs(real_pos - pos).max(axis=1).min() < 0.2, (cat, dt, pos, real_pos)


def test_changed_code_does_not_reuse_old_shards(sample_manifests, tmp_path, monkeypatch):
    """generate's output persists between DVC runs for resume; a code change (DVC reruns the
    stage) must make the samples again, not keep the old code's shards as done (issue 8: the
    fixed copy-paste left its old saturated sample in place)."""
    from defectforge.pipeline import generate as generate_stage

    _, split = sample_manifests
    p = GenerateParams(n_per_defect=2, shard_size=2, seed=0, methods=["copy-paste"])
    out = tmp_path / "gen"
    first = set(read_manifest(run_generate(p, split, out, progress=False)).to_pandas().sample_id)
    assert set(read_manifest(run_generate(p, split, out, progress=False)).to_pandas().sample_id) == first  # resumed
    monkeypatch.setattr(generate_stage, "package_sha256", lambda method: "0" * 64)  # as after an edit of the code
    again = set(read_manifest(run_generate(p, split, out, progress=False)).to_pandas().sample_id)
    assert not again & first


def test_generated_target_masks_come_from_the_types_mask_model(sample_manifests, tmp_path):
    """target_placement: generated draws each target from the type's mask model (Eq. 9), records it, and
    the sample ids change with the mask model (a retrained one regenerates)."""
    from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR, load_mask_model
    from defectforge.methods.anomalydiffusion.mask_training import fit_mask_model
    from defectforge.errors import ParamsError
    from defectforge.manifest.io import manifest_info

    _, split = sample_manifests
    sp = read_manifest(split).to_pandas()
    src_root = manifest_info(split)["dataset_root"]
    ck = tmp_path / "finetune"
    for (cat, dt), rows in sp[(sp.split == "train") & (sp.defect_type != "good")].groupby(["category", "defect_type"]):
        masks = [read_mask(os.path.join(src_root, r.mask_path)) for r in rows.itertuples()]
        fit_mask_model(None, masks, ck / cat / dt / MASK_MODEL_DIR, kind="diffusion", resolution=16, steps=200, batch_size=8, lr=3e-3, seed=0)
    p = GenerateParams(methods=["copy-paste"], n_per_defect=2, seed=0, target_placement="generated")
    with pytest.raises(ParamsError, match="target_placement"):
        run_generate(p, split, tmp_path / "none", progress=False)
    with pytest.raises(DataError, match="no trained mask model"):  # a type without one: refused before writing
        run_generate(p, split, tmp_path / "none", checkpoints=tmp_path / "empty", progress=False)
    assert not (tmp_path / "none").exists()
    root = tmp_path / "gen"
    df = read_manifest(run_generate(p, split, root, checkpoints=ck, progress=False)).to_pandas()
    # copy-paste pastes a real shape at the generated mask's place (its centre of mass)
    assert set(df.mask_origin) <= {"augmented-real/centred on generated/diffusion", "augmented-real/foreground (mask model drew no mask inside the real shape range)"}
    gen_rows = df[df.mask_origin == "augmented-real/centred on generated/diffusion"]
    assert len(gen_rows) >= 1  # a 200-step model at 16 px draws some empty masks: those fall back, labelled
    from defectforge.pipeline.generate import build_method

    by_id = sp.set_index("image_id")
    for r in gen_rows.itertuples():
        # the row is copy-paste's sample with the type's mask-model draw as its target: redo it by hand
        model = load_mask_model(ck / r.category / r.defect_type / MASK_MODEL_DIR)
        target = model.sample((r.height, r.width), r.seed)
        reals = sp[(sp.split == "train") & (sp.category == r.category) & (sp.defect_type == r.defect_type)]
        method = build_method(p, "copy-paste", ck)
        method.prepare(r.category, r.defect_type, [(read_image(os.path.join(src_root, x.image_path)), read_mask(os.path.join(src_root, x.mask_path)))
                                                    for x in reals.itertuples()])
        normal = read_image(os.path.join(src_root, by_id.loc[r.source_image_id].image_path))
        assert np.array_equal(method.generate(normal, target, r.defect_type, r.seed).mask, read_mask(root / r.raw_mask_path)), r.sample_id
    fit_mask_model(None, [np.ones((8, 8), bool)], ck / df.category.iloc[0] / df.defect_type.iloc[0] / MASK_MODEL_DIR, kind="diffusion",
                   resolution=16, steps=2, batch_size=2, seed=1)
    again = read_manifest(run_generate(p, split, tmp_path / "gen2", checkpoints=ck, progress=False)).to_pandas()
    assert not set(again.sample_id) & set(df.sample_id)


def test_placement_by_type_overrides_the_default_per_type(sample_manifests, tmp_path):
    """generate.target_placement_by_type: each listed type gets its own placement ("category/type" before
    "type"), the others the default; mask models are needed only for the types placed by them; a key that
    names no defect type of the split is refused before anything is written."""
    from defectforge.errors import ParamsError
    from defectforge.manifest.io import manifest_info
    from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR
    from defectforge.methods.anomalydiffusion.mask_training import fit_mask_model

    _, split = sample_manifests
    sp = read_manifest(split).to_pandas()
    types = sorted(set(zip(*[sp[sp.defect_type != "good"][c] for c in ("category", "defect_type")])))
    assert len(types) >= 3
    (c_gen, t_gen), (c_pri, t_pri), *_ = types
    src_root = manifest_info(split)["dataset_root"]
    ck = tmp_path / "finetune"
    rows = sp[(sp.split == "train") & (sp.category == c_gen) & (sp.defect_type == t_gen)]
    fit_mask_model(None, [read_mask(os.path.join(src_root, r.mask_path)) for r in rows.itertuples()], ck / c_gen / t_gen / MASK_MODEL_DIR,
                   kind="diffusion", resolution=16, steps=200, batch_size=8, lr=3e-3, seed=0)
    by_type = {f"{c_gen}/{t_gen}": "generated", t_pri: "prior"}
    if t_gen != t_pri:
        by_type[t_gen] = "anywhere"  # the category/type key wins over the type key
    p = GenerateParams(methods=["copy-paste"], n_per_defect=2, seed=0, target_placement="foreground", target_placement_by_type=by_type)
    assert p.model_needs() == ["mask-model"] and p.placement_for(c_gen, t_gen) == "generated"
    df = read_manifest(run_generate(p, split, tmp_path / "gen", checkpoints=ck, progress=False)).to_pandas()
    for (cat, dt), g in df.groupby(["category", "defect_type"]):
        origins = set(g.mask_origin)
        if (cat, dt) == (c_gen, t_gen):
            assert origins <= {"augmented-real/centred on generated/diffusion", "augmented-real/foreground (mask model drew no mask inside the real shape range)"}
        elif dt == t_pri:
            assert origins == {"augmented-real/prior"}, (cat, dt, origins)
        elif dt == t_gen:
            assert origins == {"augmented-real/anywhere"}, (cat, dt, origins)
        else:
            assert origins == {"augmented-real/foreground"}, (cat, dt, origins)
    bad = GenerateParams(methods=["copy-paste"], n_per_defect=2, target_placement_by_type={"no-such-type": "prior"})
    with pytest.raises(ParamsError, match="target_placement_by_type: 'no-such-type'"):
        run_generate(bad, split, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="target_placement_by_type"):
        GenerateParams(target_placement_by_type={t_pri: "edge"})


def test_defectdiffu_mask_source_is_checked_against_every_fine_tune_before_writing(sample_manifests, tmp_path):
    """mask_source: module needs each type's mask generation module, attention a fine-tune without TDIA:
    refused with the key's name before the output folder exists (the fine-tunes' json says which)."""
    import json

    from defectforge.methods.defectdiffu.config import DefectDiffuConfig
    from defectforge.errors import ParamsError

    _, split = sample_manifests
    sp = read_manifest(split).to_pandas()
    ck = tmp_path / "finetune"
    types = sorted(set(zip(sp[sp.defect_type != "good"].category, sp[sp.defect_type != "good"].defect_type)))
    for i, (cat, dt) in enumerate(types):
        (ck / cat / dt).mkdir(parents=True)
        meta = {"mode": "unet", "tdia": i == 0, "mask_module": i != 1}  # type 0: TDIA; type 1: no module
        (ck / cat / dt / "defectforge_finetune.json").write_text(json.dumps(meta))
    for source, match in (("module", "mask_source: module needs finetune.mask_module"), ("attention", "mask_source: attention does not work on a TDIA")):
        p = GenerateParams(methods=["defectdiffu"], n_per_defect=1, defectdiffu=DefectDiffuConfig(mask_source=source))
        with pytest.raises(ParamsError, match=match):
            run_generate(p, split, tmp_path / source, checkpoints=ck, progress=False)
        assert not (tmp_path / source).exists()


# ------------------------------------------------------------------ batched generation
_PROBE = '''
import json, sys
import numpy as np
from defectforge.methods.base import GenerationMethod, GenerationResult
from defectforge.manifest.io import read_manifest
from defectforge.params.generate import GenerateParams
from defectforge.pipeline import generate as generate_stage
from defectforge.pipeline.generate import generate_shards, plan_method

generate_stage.package_sha256 = lambda *a: "probe-code"  # a test-only method has no registered code to hash

class BatchProbe(GenerationMethod):
    """Paints the mask with a value of the sample's seed and of the size of the batch it shared
    (as a batched UNet call changes the last bits), and logs every batch's samples."""
    name = "batch-probe"
    log = []
    def fit(self, defects, defect):
        self.defect = defect
    def generate(self, image, mask, defect, seed):
        return self._paint(image, mask, defect, seed, 1)
    def generate_batch(self, items):
        self.log.append([(it.defect, it.seed) for it in items])
        return [self._paint(it.image, it.mask, it.defect, it.seed, len(items)) for it in items]
    def _paint(self, image, mask, defect, seed, size):
        assert defect == self.defect, "a batch holds samples of the prepared type only"
        out = image.copy()
        out[mask.astype(bool)] = (seed + 37 * size) % 256
        return GenerationResult(out, mask.astype(bool))

def run(split, out, batch_size, shard_size=3):
    from defectforge.methods.config import MethodConfig
    p = GenerateParams(n_per_defect=5, seed=0, shard_size=shard_size, batch_size=batch_size, target_placement="foreground")
    plan = plan_method(p, BatchProbe.name, read_manifest(split).to_pandas())
    return generate_shards(split, out, plan, BatchProbe(MethodConfig()), progress=False)
'''


def _probe():
    ns: dict = {}
    exec(_PROBE, ns)  # noqa: S102 - the test's own code, also run in a subprocess below
    return ns


def test_batches_hold_one_type_within_one_shard(sample_manifests, tmp_path):
    _, split = sample_manifests
    ns = _probe()
    ns["BatchProbe"].log = []
    one = _rows(ns["run"](split, tmp_path / "b1", 1))
    assert ns["BatchProbe"].log == []  # batch 1: generate() per sample, as before batching existed
    ns["run"](split, tmp_path / "b2", 2)
    sizes = [len(b) for b in ns["BatchProbe"].log]
    assert all(len({d for d, _ in b}) == 1 for b in ns["BatchProbe"].log)
    # 4 types x 5 samples in shards of 3: shards split types, batches of 2 never cross a shard or a type
    assert max(sizes) == 2
    spec_order = [s for b in ns["BatchProbe"].log for s in b]
    assert len(spec_order) == len(set(spec_order))
    shards = [[(r.defect_type, r.seed) for r in read_manifest(p).to_pandas().itertuples()]
              for p in sorted((tmp_path / "b2/manifest").glob("part-*.parquet"))]
    for batch in ns["BatchProbe"].log:
        assert any(set(batch) <= set(shard) for shard in shards), batch
    assert len(one) == len(_rows(tmp_path / "b2/manifest")) == 20


def test_a_batched_run_killed_midway_resumes_to_the_same_manifest(sample_manifests, tmp_path):
    _, split = sample_manifests
    code = _PROBE + f"\nrun({str(split)!r}, {str(tmp_path / 'gen')!r}, 2)\n"
    r = subprocess.run([sys.executable, "-c", _killed_after(3) + code], capture_output=True, text=True)
    assert r.returncode == 137, r.stderr
    assert len(list((tmp_path / "gen/manifest").glob("part-*.parquet"))) == 3
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    clean = _rows(_probe()["run"](split, tmp_path / "clean", 2))
    assert _rows(tmp_path / "gen/manifest") == clean and len(clean) == 20


def test_batch_size_enters_the_diffusion_methods_ids_only():
    from defectforge.errors import ParamsError
    from defectforge.params.file import parse_params

    one, two, four = (GenerateParams(n_per_defect=4, shard_size=4, batch_size=b) for b in (1, 2, 4))
    for name in ("blended", "anomalydiffusion", "inversion", "defectdiffu"):
        assert len({one.method_sha256(name), two.method_sha256(name), four.method_sha256(name)}) == 3
    for name in ("copy-paste", "cutpaste", "perlin"):  # they loop over generate(): the same bytes at any batch size
        assert one.method_sha256(name) == two.method_sha256(name) == four.method_sha256(name)
    # batch size 1 hashes exactly what it hashed before the option existed
    import hashlib
    import json

    common = one.model_dump(mode="json", exclude={"methods", "batch_size", "workers", "scheduler", "precision", "copy_paste", "cutpaste", "perlin",
                                                  "inversion", "blended", "defectdiffu", "anomalydiffusion"})
    blob = json.dumps({"common": common, "method": "blended", "own": one.blended.model_dump(mode="json")}, sort_keys=True)
    assert one.method_sha256("blended") == hashlib.sha256(blob.encode()).hexdigest()
    with pytest.raises(ParamsError, match="batch_size 8 must be <= shard_size 4"):
        parse_params({"generate": {"batch_size": 8, "shard_size": 4}})

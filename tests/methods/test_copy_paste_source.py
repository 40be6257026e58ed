"""Copy-paste records which real defect it pasted (issue 10): ``defect_source_index`` in the
method's metadata, the real image's id in the manifest's ``defect_source_id``."""

import numpy as np

from defectforge.manifest.io import read_manifest
from defectforge.methods.copy_paste import CopyPaste
from defectforge.params.generate import GenerateParams
from defectforge.methods.copy_paste import CopyPasteConfig
from defectforge.pipeline.generate import run as run_generate


def test_metadata_names_the_pasted_real_defect():
    """Donors of distinct colours (one with an empty mask, skipped): the pasted colour is the named donor's."""
    colours = [10, 200, 90, 160]
    defects = []
    for k, c in enumerate(colours):
        mask = np.zeros((24, 24), bool)
        if k != 1:  # defect 1 has an empty mask: never a donor, so donor i != defect i
            mask[8:14, 8:14] = True
        defects.append((np.full((24, 24, 3), c, np.uint8), mask))
    cp = CopyPaste(CopyPasteConfig(feather=0.0, match_brightness=False, max_rotation=0.0, scale_range=(1.0, 1.0), flip=False, margin=0))
    cp.fit(defects, "crack")
    normal = np.full((32, 32, 3), 128, np.uint8)
    target = np.zeros((32, 32), bool)
    target[12:18, 12:18] = True
    seen = set()
    for seed in range(20):
        r = cp.generate(normal, target, "crack", seed)
        k = r.metadata["defect_source_index"]
        assert k != 1 and defects[k][1].any()
        assert (r.image[r.mask] == colours[k]).all()  # the pixels pasted are that real defect's
        seen.add(k)
    assert seen == {0, 2, 3}


def test_manifest_rows_record_the_real_defect_id(sample_manifests, tmp_path):
    _, split = sample_manifests
    out = run_generate(GenerateParams(n_per_defect=3, shard_size=2, seed=0, methods=["copy-paste"]), split, tmp_path / "gen", progress=False)
    df = read_manifest(out).to_pandas()
    reals = read_manifest(split).to_pandas().set_index("image_id")
    assert df.defect_source_id.notna().all()
    src = reals.loc[df.defect_source_id]
    assert (src.split == "train").all() and (src.defect_type.values == df.defect_type.values).all()
    assert (src.category.values == df.category.values).all()
    assert df.groupby("defect_type").defect_source_id.nunique().max() > 1  # not one constant id


def test_brightness_match_is_a_gain_so_a_dark_pit_is_not_clipped_to_black():
    """A pit of floor 30 in a surface of 120, pasted on a darker surface of 60: the gain
    (60 / 120) keeps the floor at 15, where an offset (-60) would clip it to 0 (issue 8)."""
    donor = np.full((24, 24, 3), 120, np.uint8)
    mask = np.zeros((24, 24), bool)
    mask[8:16, 8:16] = True
    donor[mask] = 30
    cp = CopyPaste(CopyPasteConfig(feather=0.0, match_brightness=True, max_rotation=0.0, scale_range=(1.0, 1.0), flip=False, margin=4))
    cp.fit([(donor, mask)], "hole")
    normal = np.full((40, 40, 3), 60, np.uint8)
    target = np.zeros((40, 40), bool)
    target[16:24, 16:24] = True
    r = cp.generate(normal, target, "hole", seed=0)
    assert np.abs(r.image[r.mask].astype(int) - 15).max() <= 1
    assert (r.image[~r.mask] == 60).all()

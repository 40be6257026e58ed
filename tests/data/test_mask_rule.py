"""``data.mask_rule`` substitutes only its documented fields, plainly: attribute access, indexes,
conversions and format specs are refused with one line naming data.mask_rule (exit 2 through the
command line), never evaluated (AttributeError, or a 5000-character file name)."""

from __future__ import annotations

import numpy as np
import pytest
from cli_helpers import run_cli

from defectforge.data.adapters import ingest
from defectforge.data.files import write_png
from defectforge.errors import ParamsError


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "ds"
    for name in ("a", "b"):
        write_png(root / f"plate/good/{name}.png", np.full((16, 16, 3), 80, np.uint8))
    write_png(root / "plate/rust/r1.png", np.full((16, 16, 3), 120, np.uint8))
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    write_png(root / "plate/rust/r1_mask.png", mask)
    return root


BAD = ["{stem.nope}_mask.png", "{stem.__class__.__name__}_mask.png", "{stem:>5000}_mask.png", "{stem[0]}_mask.png", "{stem!r}_mask.png"]


@pytest.mark.parametrize("rule", BAD)
def test_fields_with_attributes_or_format_specs_are_refused(folder, tmp_path, rule):
    with pytest.raises(ParamsError) as err:
        ingest("folder", folder, mask_rule=rule)
    assert "\n" not in str(err.value) and "data.mask_rule" in str(err.value)
    r = run_cli("ingest", "--layout", "folder", "--root", folder, "--mask-rule", rule, "--out", tmp_path / "s.parquet", "--params", tmp_path / "none.yaml")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "data.mask_rule" in errors[0], r.stdout + r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("rule", ["{stem}_mask.png", "../rust/{stem}_mask.png"])
def test_documented_fields_are_substituted_plainly(folder, rule):
    df = ingest("folder", folder, mask_rule=rule)
    assert df.loc[df.defect_type == "rust", "mask_path"].tolist() == ["plate/rust/r1_mask.png"]


def test_literal_braces_and_every_documented_field(tmp_path):
    root = tmp_path / "ds"
    write_png(root / "plate/good/a.png", np.full((16, 16, 3), 80, np.uint8))
    write_png(root / "plate/rust/r1.png", np.full((16, 16, 3), 120, np.uint8))
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    write_png(root / "plate/rust/{plate-rust-r1.png-.png}.png", mask)
    df = ingest("folder", root, mask_rule="{{{category}-{defect_type}-{name}-{suffix}}}.png")
    assert df.loc[df.defect_type == "rust", "mask_path"].tolist() == ["plate/rust/{plate-rust-r1.png-.png}.png"]

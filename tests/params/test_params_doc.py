"""docs/params.md is what ``python -m defectforge.params_doc`` writes from today's params models,
so the params reference cannot go stale: a new key, bound, default or comment changes it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_params_reference_is_current():
    # a fresh interpreter: a method registered by another test must not enter the reference
    r = subprocess.run([sys.executable, "-m", "defectforge.params_doc", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + "\n(regenerate it: python -m defectforge.params_doc)"


def test_reference_lists_every_key_with_its_bounds_and_comment():
    from defectforge.params.file import Params
    from defectforge.params_doc import render

    text = render()
    for section, info in Params.model_fields.items():
        assert f"## `{section}`" in text
        for key in info.annotation.model_fields:
            assert f"| `{key}` |" in text.split(f"## `{section}`", 1)[1], f"{section}.{key}"
    # a bound and a description taken from the source comment beside the field
    assert "| `on_bad` | `fail` \\| `skip` | `\"fail\"` |  | bad samples: stop ingest" in text
    assert "## `generate.inversion`" in text

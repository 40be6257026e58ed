"""validate checks what is stored, not what the reader casts: a ``width`` column written as
strings fails with one line naming the column and both types; an id with a newline fails."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from cli_helpers import one_image_manifest, run_cli

from defectforge.manifest.validate import validate_manifest


def _source(tmp_path, image_id="cat/crack/000"):
    return one_image_manifest(tmp_path, "source", image_id)


def test_a_valid_manifest_passes(tmp_path):
    assert validate_manifest(_source(tmp_path)) == []


def test_width_stored_as_strings_fails_validate(tmp_path):
    path = _source(tmp_path)
    table = pq.read_table(path)
    i = table.schema.get_field_index("width")
    strings = table.set_column(i, pa.field("width", pa.string()), pa.array(["16"]))
    pq.write_table(strings.replace_schema_metadata(table.schema.metadata), path)
    assert validate_manifest(path) == ["width: stored as string, the source schema says int32"]
    r = run_cli("validate", path, "--no-hashes")
    assert r.returncode != 0 and "width: stored as string" in r.stderr + r.stdout, r.stderr + r.stdout


def test_image_id_with_a_newline_fails_validate_in_one_line(tmp_path):
    failures = validate_manifest(_source(tmp_path, image_id="cat/crack/0\n00"))
    assert len(failures) == 1 and "control character" in failures[0] and "\n" not in failures[0]

"""The Great Expectations 1.x suite every manifest must pass.

Expectations (per kind):
* ids unique and not null; required columns not null;
* every path column points at an existing file under the dataset root
  (custom expectation ``ExpectColumnValuesToBeExistingFiles``);
* masks non-empty and not the whole image (``mask_fraction`` strictly in (0, 1));
* sizes positive; enum columns in their allowed sets; hashes look like SHA-256.

``validate_manifest`` returns the list of failures (empty when valid);
``check_manifest`` raises :class:`ManifestError` with a readable list.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import ClassVar

import pandas as pd

from defectforge.errors import ManifestError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.schema import ID_COLUMN, PATH_COLUMNS, schema_for

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

_SUITE_CLASSES = None


def _gx_classes():
    """Import GX lazily (it takes seconds) and define the custom file-exists expectation once."""
    global _SUITE_CLASSES
    if _SUITE_CLASSES is not None:
        return _SUITE_CLASSES
    import great_expectations as gx
    from great_expectations.execution_engine import PandasExecutionEngine
    from great_expectations.expectations.expectation import ColumnMapExpectation
    from great_expectations.expectations.metrics import ColumnMapMetricProvider, column_condition_partial

    class ColumnValuesExistingFile(ColumnMapMetricProvider):
        condition_metric_name = "column_values.existing_file"
        condition_value_keys = ("root",)

        @column_condition_partial(engine=PandasExecutionEngine)
        def _pandas(cls, column, root, **kwargs):
            return column.map(lambda p: os.path.isfile(os.path.join(root, str(p))))

    class ExpectColumnValuesToBeExistingFiles(ColumnMapExpectation):
        """Each non-null value is a path, relative to ``root``, of an existing file."""

        map_metric: ClassVar[str] = "column_values.existing_file"
        success_keys: ClassVar[tuple] = ("root", "mostly")
        root: str

    _SUITE_CLASSES = (gx, ExpectColumnValuesToBeExistingFiles)
    return _SUITE_CLASSES


_ENUMS = {"split": {"split": ["train", "test"]}}
_SHA = r"^[0-9a-f]{64}$"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\- ]*$"


def build_suite(kind: str, root: str, methods: list[str] | None = None):
    gx, ExistingFiles = _gx_classes()
    E = gx.expectations
    suite = gx.ExpectationSuite(name=f"defectforge-{kind}")
    schema = schema_for(kind)
    idcol = ID_COLUMN[kind]
    suite.add_expectation(E.ExpectColumnValuesToBeUnique(column=idcol))
    for f in schema:
        if not f.nullable:
            suite.add_expectation(E.ExpectColumnValuesToNotBeNull(column=f.name))
    for col in PATH_COLUMNS[kind]:
        suite.add_expectation(ExistingFiles(column=col, root=root))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="width", min_value=1))
    suite.add_expectation(E.ExpectColumnValuesToBeBetween(column="height", min_value=1))
    suite.add_expectation(
        E.ExpectColumnValuesToBeBetween(column="mask_fraction", min_value=0, max_value=1, strict_min=True, strict_max=True)
    )
    for col in ("category", "defect_type"):
        suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column=col, regex=_NAME))
    sha_cols = ["image_sha256", "mask_sha256"] + (["raw_mask_sha256", "source_sha256"] if kind == "synthetic" else [])
    for col in sha_cols:
        suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column=col, regex=_SHA))
    for col, allowed in _ENUMS.get(kind, {}).items():
        suite.add_expectation(E.ExpectColumnValuesToBeInSet(column=col, value_set=allowed))
    if kind == "synthetic":
        suite.add_expectation(E.ExpectColumnValuesToNotBeInSet(column="defect_type", value_set=["good"]))
        if methods:
            suite.add_expectation(E.ExpectColumnValuesToBeInSet(column="method", value_set=methods))
    return suite


def _frame(df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """Add derived columns the suite checks: the mask fraction of defect rows."""
    df = df.copy()
    area = df["mask_area"].astype("float64")
    frac = area / (df["width"].astype("float64") * df["height"].astype("float64"))
    if kind in ("source", "split"):
        frac = frac.where(df["defect_type"] != "good")
    df["mask_fraction"] = frac
    return df


def validate_frame(df: pd.DataFrame, *, kind: str, root: str | os.PathLike, methods: list[str] | None = None) -> list[str]:
    """Run the suite on a DataFrame; returns readable failure lines (empty list = valid)."""
    gx, _ = _gx_classes()
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    try:
        ctx.variables.progress_bars = {"globally": False}
    except Exception:  # noqa: BLE001 - older GX without progress-bar settings
        pass
    bd = ctx.data_sources.add_pandas("manifest").add_dataframe_asset("rows").add_batch_definition_whole_dataframe("all")
    frame = _frame(df, kind)
    if methods is None and kind == "synthetic":
        from defectforge.config import METHOD_NEEDS_CHECKPOINTS

        methods = list(METHOD_NEEDS_CHECKPOINTS)
    suite = build_suite(kind, str(root), methods)
    result = bd.get_batch(batch_parameters={"dataframe": frame}).validate(suite)
    failures = []
    idcol = ID_COLUMN[kind]
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        col = cfg.kwargs.get("column", "")
        res = r.result or {}
        bad = res.get("partial_unexpected_list") or res.get("unexpected_list") or []
        idx = res.get("partial_unexpected_index_list") or []
        ids = []
        for i in idx[:5]:
            try:
                ids.append(str(frame.iloc[i][idcol]) if isinstance(i, int) else str(i))
            except Exception:  # noqa: BLE001
                pass
        what = cfg.type.replace("expect_column_values_to_", "").replace("_", " ")
        n = res.get("unexpected_count", len(bad))
        line = f"{col}: {n} row(s) fail '{what}'"
        if bad:
            line += f", e.g. {bad[:3]}"
        if ids:
            line += f" (rows {ids})"
        if r.exception_info and r.exception_info.get("raised_exception"):
            line = f"{col}: expectation {cfg.type} raised {r.exception_info.get('exception_message')}"
        failures.append(line)
    return failures


def validate_manifest(path: str | os.PathLike) -> list[str]:
    """Validate a manifest file or shard folder against its kind's suite."""
    info = manifest_info(path)
    df = read_manifest(path).to_pandas()
    if df.empty:
        return [f"{path}: manifest has no rows"]
    return validate_frame(df, kind=info["kind"], root=info["dataset_root"])


def check_manifest(path: str | os.PathLike) -> None:
    """Raise ManifestError listing every failure if ``path`` does not pass its suite."""
    failures = validate_manifest(path)
    if failures:
        raise ManifestError(f"{Path(path)}: {len(failures)} expectation(s) failed: " + "; ".join(failures))


def write_checked(df, out, *, kind: str, dataset_root) -> Path:
    """Write ``df`` to a temporary manifest, validate it, then move it to ``out``.

    ``out`` must be a regular file or missing (never a folder or a device node); errors
    name ``out``, not the temporary file that is removed.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise ManifestError(f"{out}: exists and is not a regular file; give a new .parquet path")
    tmp = out.with_name(f".{out.name}.unchecked")
    try:
        write_manifest(df, tmp, kind=kind, dataset_root=dataset_root)
        check_manifest(tmp)
        os.replace(tmp, out)
    except ManifestError as exc:
        raise ManifestError(str(exc).replace(str(tmp), str(out))) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out

"""The Great Expectations 1.x suite every manifest must pass.

Expectations (per kind):
* ids unique and not null; required columns not null;
* every path column points at an existing file under the dataset root
  (custom expectation ``ExpectColumnValuesToBeExistingFiles``);
* masks non-empty and not the whole image (``mask_fraction`` strictly in (0, 1));
* sizes positive; enum columns in their allowed sets; hashes look like SHA-256.

``validate_manifest`` returns the list of failures (empty when valid);
``check_manifest`` raises :class:`ManifestError` with a readable list.

Content hashes: :func:`verify_hashes` (``verify_hashes(table, root, workers=None) ->
list[HashMismatch]``) re-hashes every row's files in parallel and returns the rows whose
bytes no longer match ``image_sha256`` / ``mask_sha256`` / ``raw_mask_sha256``;
:func:`check_hashes` raises for a manifest file (``defectforge validate`` runs it
unless ``--no-hashes``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from defectforge.data.files import NotRegularFile, sha256_file
from defectforge.errors import DataError, DefectforgeError, ManifestError
from defectforge.manifest.io import manifest_info, read_manifest, read_parquet_schema, shard_files, write_manifest
from defectforge.manifest.paths import check_rows_confined, check_rows_regular
from defectforge.manifest.schema import ID_COLUMN, PATH_COLUMNS, schema_for

if TYPE_CHECKING:
    import pandas as pd  # imported where a frame is made: the consumer side reads without pandas

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
METHOD_ID = r"^[a-z][a-z0-9-]*$"  # a registered method's id (copy-paste, anomalydiffusion, ...)
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
        else:  # a method id; the manifest layer does not import the method registry (it sits below it)
            suite.add_expectation(E.ExpectColumnValuesToMatchRegex(column="method", regex=METHOD_ID))
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


MADE_BY = {"source": "ingest's output", "split": "the split stage's output",
           "synthetic": "the generate or refine stage's output"}


def require_kind(path: str | os.PathLike, kind: str, role: str) -> dict[str, str]:
    """:func:`manifest_info` of ``path`` when it is a ``kind`` manifest; otherwise one line saying
    which kind was given and which one ``role`` (``"release --refined"``) expects."""
    info = manifest_info(path)
    if info["kind"] != kind:
        raise ManifestError(f"{path}: is a {info['kind']} manifest ({MADE_BY.get(info['kind'], 'unknown')}), "
                            f"but {role} takes a {kind} manifest ({MADE_BY[kind]})")
    return info


def stored_type_problems(path: str | os.PathLike, kind: str) -> list[str]:
    """Columns whose stored Parquet type is not the schema's, one line each.

    The reader casts what it can (a ``width`` stored as the strings ``"32"`` reads as int32),
    so only the stored schema shows that a file was not written as a manifest of its kind.
    """
    import pyarrow as pa

    schema = schema_for(kind)
    p = Path(path)
    files = [p] if p.is_file() else shard_files(p)
    problems: dict[str, list[str]] = {}
    for f in files:
        for field in read_parquet_schema(f):
            if field.name not in schema.names:
                continue
            want = schema.field(field.name).type
            got = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
            if not got.equals(want):
                problems.setdefault(f"{field.name}: stored as {field.type}, the {kind} schema says {want}", []).append(f.name)
    return [line + ("" if len(files) == 1 else f" (in {len(names)} of {len(files)} shards, e.g. {names[0]})")
            for line, names in problems.items()]


def _control_character_problems(df: pd.DataFrame, kind: str) -> list[str]:
    """Ids and names holding a control character (a newline, a tab, ...): they break every
    line-oriented report and file listing that shows them."""
    problems = []
    for col in dict.fromkeys([ID_COLUMN[kind], "category", "defect_type"]):
        if col not in df.columns:
            continue
        bad = [v for v in df[col].dropna().astype(str) if has_control_character(v)]
        if bad:
            problems.append(f"{col}: {len(bad)} row(s) hold a control character (newline, tab, ...), e.g. {bad[:3]}")
    return problems


def has_control_character(text: str) -> bool:
    """True if ``text`` holds a C0/C1 control character (``\\n``, ``\\t``, ``\\x7f``, ...)."""
    return any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in text)


def validate_manifest(path: str | os.PathLike) -> list[str]:
    """Validate a manifest file or shard folder against its kind's suite (its rows must stay in its root)."""
    info = manifest_info(path)
    types = stored_type_problems(path, info["kind"])
    if types:  # the suite would check values the reader cast, not what is stored
        return types
    df = read_manifest(path).to_pandas()
    if df.empty:
        return [f"{path}: manifest has no rows"]
    check_rows_confined(df, info["dataset_root"], str(path))
    check_rows_regular(df, info["dataset_root"], str(path))  # a fifo would block the suite's reads, a device feed them
    return _control_character_problems(df, info["kind"]) + validate_frame(df, kind=info["kind"], root=info["dataset_root"])


def check_manifest(path: str | os.PathLike) -> None:
    """Raise ManifestError listing every failure if ``path`` does not pass its suite."""
    failures = validate_manifest(path)
    if failures:
        raise ManifestError(f"{Path(path)}: {len(failures)} expectation(s) failed: " + "; ".join(failures))


def write_checked(df, out, *, kind: str, dataset_root) -> Path:
    """Write ``df`` to a temporary manifest, validate it, then move it to ``out``.

    ``out`` must be a regular file or missing (never a folder, a symlink or a device
    node such as ``/dev/full``); errors name ``out``, never the temporary file, which is
    removed. The temporary name is unique (``mkstemp``): a user's file never collides with it.
    """
    out = Path(out)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise ManifestError(f"{out}: exists and is not a regular file; give a new .parquet path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".unchecked", dir=out.parent)
        os.close(fd)
    except OSError as exc:
        raise ManifestError(f"{out}: cannot write here ({exc.strerror or exc})") from None
    tmp = Path(name)
    try:
        write_manifest(df, tmp, kind=kind, dataset_root=dataset_root)
        check_manifest(tmp)
        os.replace(tmp, out)
    except DefectforgeError as exc:
        raise type(exc)(untemp(str(exc), tmp, out)) from None
    except OSError as exc:
        raise ManifestError(f"{out}: cannot write ({exc.strerror or untemp(str(exc), tmp, out)})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def untemp(message: str, tmp: Path, out: Path) -> str:
    """``message`` with every spelling of the temporary file's path replaced by ``out``."""
    for spelling in {str(tmp.resolve()), str(tmp), tmp.name}:
        message = message.replace(spelling, str(out) if spelling != tmp.name else out.name)
    return message


# --- completeness of a generate output ----------------------------------------------
# A generate method folder holds its plan: ``plan.sha256`` (the hash of the planned sample
# ids, which decides whether finished shards are reused) and ``plan.json`` (that hash, the
# sample and shard counts, and what resumes the run). Shards are committed by an atomic
# rename, so a planned shard that is missing or unreadable was never finished: the folder
# is a half-made output and must not be released or called valid.

PLAN_FILE = "plan.sha256"
PLAN_INFO = "plan.json"


def write_plan_info(folder: str | os.PathLike, *, plan_sha256: str, samples: int, shard_size: int, split=None, root=None, checkpoints=None) -> None:
    """Record a generate method folder's plan: the counts the completeness check needs and what resumes it."""
    import json

    from defectforge.data.files import atomic_write_bytes

    info = {
        "plan_sha256": plan_sha256,
        "samples": int(samples),
        "shard_size": int(shard_size),
        "shards": (int(samples) + int(shard_size) - 1) // int(shard_size),
        "split": None if split is None else str(split),
        "root": None if root is None else str(root),
        "checkpoints": None if checkpoints is None else str(checkpoints),
    }
    atomic_write_bytes(Path(folder) / PLAN_INFO, (json.dumps(info, indent=1, sort_keys=True) + "\n").encode())


def plan_folders(path: str | os.PathLike) -> list[Path]:
    """The generate method folders (holding a plan) that the manifest ``path`` is made of or reads from.

    Looked for: ``path`` itself and its method sub-folders (a generate root), the folder
    holding a ``manifest/`` shard folder, and the same under the manifest's dataset root
    (a refined or released manifest whose files live in a generate output).
    """
    path = Path(path)
    bases = [path] if path.is_dir() else []
    if path.is_dir() and path.name == "manifest":
        bases.append(path.parent)
    try:
        bases.append(Path(manifest_info(path)["dataset_root"]))
    except DefectforgeError:
        pass
    found: dict[str, Path] = {}
    for base in bases:
        if not base.is_dir() or base.is_symlink():
            continue
        for d in [base, *sorted(c for c in base.iterdir() if c.is_dir() and not c.is_symlink())]:
            if (d / PLAN_FILE).is_file():
                found.setdefault(os.path.realpath(d), d)
    return list(found.values())


def _shard_problem(manifest_dir: Path, index: int, expected_rows: int) -> str | None:
    """Why planned shard ``index`` is not there as a committed file of ``expected_rows`` rows (None: it is)."""
    import pyarrow.parquet as pq

    f = manifest_dir / f"part-{index:05d}.parquet"
    if f.is_symlink() or not f.is_file():
        return "missing"
    try:
        rows = pq.read_metadata(f).num_rows
    except Exception:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for junk: the shard is not committed
        return "unreadable"
    return None if rows == expected_rows else f"{rows} rows, {expected_rows} planned"


def _resume_hint(folder: Path, info: dict) -> str:
    """The command that resumes the generate run that made ``folder`` (one line)."""
    root, split = info.get("root"), info.get("split")
    if root and split and os.path.realpath(root) != os.path.realpath(folder):
        ck = f" --checkpoints {info['checkpoints']}" if info.get("checkpoints") else ""
        cmd = f"defectforge generate --split {split} --out {root}{ck}"
        return f"resume it with `{cmd}` (same params.yaml; in the DVC project: `dvc repro generate`)"
    return "resume it by rerunning the generate call that made it (same arguments): finished shards are kept"


def incomplete_plans(path: str | os.PathLike) -> list[str]:
    """One line per generate method folder behind ``path`` whose planned shards are not all committed."""
    import json

    lines = []
    for folder in plan_folders(path):
        try:
            info = json.loads((folder / PLAN_INFO).read_text())
            total, size, n = int(info["samples"]), int(info["shard_size"]), int(info["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            lines.append(f"{folder}: generate output without a readable {PLAN_INFO} (its shard count is unknown, so it cannot "
                         "be checked complete); rerun the generate command that made it to finish and record it")
            continue
        plan = (folder / PLAN_FILE).read_text().strip()
        if plan != info.get("plan_sha256"):
            lines.append(f"{folder}: {PLAN_INFO} does not belong to {PLAN_FILE} (a generate run was stopped while planning); "
                         f"{_resume_hint(folder, info)}")
            continue
        problems = {}
        for i in range(n):
            why = _shard_problem(folder / "manifest", i, min(size, total - i * size))
            if why is not None:
                problems[i] = why
        extra = sorted(f.name for f in (folder / "manifest").glob("part-*.parquet") if f.name not in {f"part-{i:05d}.parquet" for i in range(n)})
        if problems:
            shown = ", ".join(f"{i} ({why})" for i, why in list(problems.items())[:5]) + (", ..." if len(problems) > 5 else "")
            lines.append(f"{folder}: {len(problems)} of {n} planned shards missing or not committed (shard {shown}); "
                         f"the generate run did not finish - {_resume_hint(folder, info)}")
        elif extra:
            lines.append(f"{folder}: shard files outside its plan of {n} ({', '.join(extra[:3])}); {_resume_hint(folder, info)}")
    return lines


def check_complete(path: str | os.PathLike) -> None:
    """Raise ManifestError (one line) when a generate output behind ``path`` is half-made (:func:`incomplete_plans`)."""
    lines = incomplete_plans(path)
    if lines:
        more = f" (and {len(lines) - 1} more incomplete method folder(s))" if len(lines) > 1 else ""
        raise ManifestError(f"{lines[0]}{more}")


# --- content hashes -----------------------------------------------------------------

HASHED_COLUMNS = (("image_path", "image_sha256"), ("mask_path", "mask_sha256"), ("raw_mask_path", "raw_mask_sha256"))


class HashMismatch(NamedTuple):
    """A row whose file's bytes do not hash to the value its manifest records."""

    row_id: str  # the manifest's id column (image_id / sample_id)
    column: str  # the hash column, e.g. "image_sha256"
    path: str  # the file, absolute (the manifest's relative path under ``root``)
    expected: str
    actual: str | None  # None: the file is missing or unreadable
    problem: str | None = None  # what the path is when it is not a regular file ("a fifo"); never opened then

    def line(self) -> str:
        if self.problem is not None:
            return f"row {self.row_id}: {self.path}: not a regular file ({self.problem}), so {self.column} cannot be checked"
        got = "file missing or unreadable" if self.actual is None else f"file hashes to {self.actual[:12]}..."
        return f"row {self.row_id}: {self.path}: {self.column} {self.expected[:12]}... does not match ({got})"


_NOT_REGULAR = "not a regular file: "  # prefix of a digest slot that holds what the path is instead


def _sha256_or_none(path: str) -> str | None:
    """The file's hex SHA-256; None when missing or unreadable; ``_NOT_REGULAR + what`` for a fifo,
    device, socket or folder (checked before opening: :func:`sha256_file`)."""
    try:
        return sha256_file(path)
    except NotRegularFile as exc:
        return _NOT_REGULAR + str(exc).rsplit("(", 1)[-1].rstrip(")")
    except OSError:
        return None


def verify_hashes(table, root: str | os.PathLike, workers: int | None = None) -> list[HashMismatch]:
    """Check every row's file hashes against the files' bytes; returns the mismatches (empty: all good).

    ``table``: a manifest as a pandas DataFrame or pyarrow Table; ``root``: its dataset
    root (``manifest_info(path)["dataset_root"]``). Every (path, hash) column pair the
    table has is checked (``image_path``/``image_sha256``, ``mask_path``/``mask_sha256``,
    ``raw_mask_path``/``raw_mask_sha256``); rows with no path or no hash are skipped.
    Files are hashed on a thread pool of ``workers`` threads (default: 4 per CPU, at
    most 32): hashlib releases the GIL, so hashing and reading overlap. Each distinct
    file is hashed once. Mismatches come sorted by row id, then column.
    """
    import pandas as pd

    df = table.to_pandas() if hasattr(table, "to_pandas") and not isinstance(table, pd.DataFrame) else table
    idcol = next((c for c in ("sample_id", "image_id") if c in df.columns), None)
    check_rows_confined(df, root)  # a link out of the root is refused, never hashed
    root = Path(root)
    wanted: list[tuple[str, str, str, str]] = []  # (row id, hash column, file, expected)
    for path_col, sha_col in HASHED_COLUMNS:
        if path_col not in df.columns or sha_col not in df.columns:
            continue
        ids = df[idcol].astype(str).tolist() if idcol else [str(i) for i in range(len(df))]
        for rid, rel, expected in zip(ids, df[path_col].tolist(), df[sha_col].tolist()):
            if isinstance(rel, str) and isinstance(expected, str):
                wanted.append((rid, sha_col, os.path.join(root, rel), expected))
    files = sorted({w[2] for w in wanted})
    n = workers or min(32, 4 * (os.cpu_count() or 1))
    if n <= 1 or len(files) <= 1:
        digests = dict(zip(files, map(_sha256_or_none, files)))
    else:
        with ThreadPoolExecutor(max_workers=n) as pool:
            digests = dict(zip(files, pool.map(_sha256_or_none, files)))
    bad = []
    for rid, col, f, exp in wanted:
        got = digests[f]
        if got is not None and got.startswith(_NOT_REGULAR):
            bad.append(HashMismatch(rid, col, f, exp, None, got[len(_NOT_REGULAR):]))
        elif got != exp:
            bad.append(HashMismatch(rid, col, f, exp, got))
    return sorted(bad, key=lambda m: (m.row_id, m.column))


def require_hashes(df, root: str | os.PathLike, *, source: str = "manifest", workers: int | None = None) -> None:
    """Check each row's file hashes (image, mask, raw mask) against the files' bytes (:func:`verify_hashes`:
    a thread pool, each file once). Raises :class:`DataError`, one line naming ``source``, the first bad row
    and its file (and how many more are bad), when a file is missing or differs."""
    bad = verify_hashes(df, root, workers)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(f"{source}: {bad[0].line()}{more}; the file changed after it was recorded - regenerate it, "
                        "or release with --no-verify to skip the check")


def hash_failures(path: str | os.PathLike, workers: int | None = None) -> list[str]:
    """:func:`verify_hashes` of the manifest file or shard folder ``path``, as readable lines."""
    info = manifest_info(path)
    df = read_manifest(path).to_pandas()
    check_rows_confined(df, info["dataset_root"], str(path))
    check_rows_regular(df, info["dataset_root"], str(path))
    return [m.line() for m in verify_hashes(df, info["dataset_root"], workers)]


def check_hashes(path: str | os.PathLike, workers: int | None = None, show: int = 3) -> None:
    """Raise ManifestError naming the manifest, the rows and the files whose bytes changed."""
    lines = hash_failures(path, workers)
    if lines:
        more = f"; and {len(lines) - show} more" if len(lines) > show else ""
        raise ManifestError(f"{Path(path)}: {len(lines)} file hash(es) do not match: " + "; ".join(lines[:show]) + more)

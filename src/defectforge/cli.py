"""The ``defectforge`` command line: one subcommand per stage, plus ``validate``.

Every subcommand reads its knobs from params.yaml (``--params``), lets the command
line override the paths, and turns a :class:`DefectforgeError` into one line on
stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from defectforge.errors import DefectforgeError
from defectforge.pipeline.entry import end_progress_lines, prepare_process

prepare_process()  # as the DVC stage scripts do, before anything imports torch: the same threads and kernels, the same bytes

app = typer.Typer(add_completion=False, no_args_is_help=True, help="defectforge: synthetic industrial defect datasets.")
DEFAULT_PARAMS = Path("params.yaml")
PARAMS = typer.Option(DEFAULT_PARAMS, "--params", help="params file (default: params.yaml here; where there is none, the defaults)")
SET = typer.Option(None, "--set", "-S", help="override a params key as dvc exp run -S does, e.g. -S detector.seeds=[0,1] "
                   "(repeatable)")
SPLIT = typer.Option(..., help="split manifest")
REFINED = typer.Option(..., help="the refine command's manifest")


def _params(path: Path, sets: Optional[list[str]] = None):
    """params.yaml (``--params``) with the ``-S`` overrides, validated as the DVC stages validate it. Where
    the params file does not exist, every stage takes the defaults and says so in one line (a folder or
    an unreadable file given as ``--params`` is an error)."""
    from defectforge.params.file import parse_params
    from defectforge.params.loader import override, read_mapping

    if not os.path.lexists(path):
        print(f"note: no {path} here: the params defaults" + (" with the -S overrides" if sets else ""), file=sys.stderr)
        data = {}
    else:
        data = read_mapping(path) or {}
    return parse_params(override(data, sets or []), f"{path}" + (" with -S" if sets else ""))


def _out_folder(out: Path, what: str, *inputs: Optional[Path]) -> None:
    """Refuse ``--out`` (one line, exit 2, nothing written) when it is ``.``, ``..``, the current folder by any
    spelling or one holding it, ``/``, a project's root, or a folder holding one of ``inputs`` (or their
    manifests' dataset roots); the same check every stage's own output folder goes through."""
    from defectforge.data.files import check_out_place
    from defectforge.manifest.io import manifest_info

    roots = []
    for i in inputs:
        if i is None:
            continue
        try:
            roots.append(manifest_info(i)["dataset_root"])
        except (DefectforgeError, OSError):
            pass  # not a manifest (a model folder), or unreadable: the stage says so
    check_out_place(out, f"--out ({what})", [*inputs, *roots])


def _checked(section: str, params: Path, sets: Optional[list[str]], out: Path, what: str, *inputs: Optional[Path],
             split: Optional[Path] = None, refined: Optional[Path] = None):
    """The command's params section, once its manifests' kinds and its ``--out`` place are checked."""
    p = getattr(_params(params, sets), section)
    if split is not None:
        _kind(split, "split", f"{section} --split")
    if refined is not None:
        _kind(refined, "synthetic", f"{section} --refined")
    _out_folder(out, what, split, *inputs)
    return p


def _kind(path: Path, kind: str, role: str) -> None:
    """Refuse a manifest of another kind than ``kind`` for ``role`` (``"generate --split"``) in one line."""
    from defectforge.manifest.validate import require_kind

    require_kind(path, kind, role)


@app.command()
def sample(out: Path = typer.Option(Path("data/sample"), help="output folder (MVTec AD layout)"), params: Path = PARAMS,
        set_: Optional[list[str]] = SET):
    """Make the built-in sample dataset."""
    from defectforge.pipeline import sample as stage

    p = _params(params, set_).sample
    _out_folder(out, "sample folder")
    typer.echo(stage.run(p, out))


@app.command()
def ingest(
    out: Path = typer.Option(..., help="source manifest to write (.parquet)"),
    layout: Optional[str] = typer.Option(None, help="mvtec | folder | magnetic-tile (default: params data.layout)"),
    root: Optional[Path] = typer.Option(None, help="dataset folder (default: params data.root)"),
    mask_rule: Optional[str] = typer.Option(None, help="folder layout: mask path rule, e.g. '{stem}_mask.png'"),
    image_glob: Optional[str] = typer.Option(None, help="folder layout: image pattern, e.g. 'images/*'"),
    on_bad: Optional[str] = typer.Option(None, help="fail | skip: bad samples stop ingest, or are left out and listed "
                                         "in <out stem>.quarantine.json (default: params data.on_bad)"),
    params: Path = PARAMS,
    set_: Optional[list[str]] = SET,
):
    """Read a dataset folder into a validated source manifest (bad samples: see --on-bad)."""
    from defectforge.params.file import parse_params
    from defectforge.pipeline import ingest as stage

    p = _params(params, set_).data
    updates = {k: v for k, v in {"layout": layout, "mask_rule": mask_rule, "image_glob": image_glob, "on_bad": on_bad}.items() if v is not None}
    if updates:
        p = parse_params({"data": {**p.model_dump(), **updates}}, "command line").data
    _summary(stage.run(p, out, root=root))


@app.command()
def split(source: Path = typer.Option(..., help="source manifest"), out: Path = typer.Option(..., help="split manifest to write"), params: Path = PARAMS,
        set_: Optional[list[str]] = SET):
    """Assign train/test and folds (seeded) to a source manifest."""
    from defectforge.pipeline import split as stage

    p = _params(params, set_).split
    _kind(source, "source", "split --source")
    _summary(stage.run(p, source, out))


@app.command()
def pretrain(split: Path = typer.Option(..., help="split manifest"), out: Path = typer.Option(..., help="model folder to write"), params: Path = PARAMS,
        set_: Optional[list[str]] = SET):
    """Train (tiny profile) or record (pretrained profile) the base diffusion model."""
    from defectforge.pipeline import pretrain as stage

    p = _params(params, set_)
    _kind(split, "split", "pretrain --split")
    _out_folder(out, "pretrain folder", split)
    typer.echo(stage.run(p.pretrain, split, out, needed=p.generate.model_needs()))


@app.command()
def finetune(
    split: Path = SPLIT,
    base: Path = typer.Option(..., help="the pretrain command's folder"),
    out: Path = typer.Option(..., help="checkpoint folder to write"),
    params: Path = PARAMS,
    set_: Optional[list[str]] = SET,
):
    """Fine-tune one checkpoint per (category, defect type) from the base model."""
    from defectforge.pipeline import finetune as stage

    p = _params(params, set_)
    _kind(split, "split", "finetune --split")
    _out_folder(out, "finetune folder", split, base)
    typer.echo(stage.run(p.finetune, split, base, out, needed=p.generate.model_needs()))


@app.command()
def generate(
    split: Path = SPLIT,
    out: Path = typer.Option(..., help="output dataset folder"),
    checkpoints: Optional[Path] = typer.Option(None, help="the finetune command's folder (needed by the diffusion methods)"),
    method: Optional[list[str]] = typer.Option(None, help="override generate.methods (repeatable)"),
    params: Path = PARAMS,
    set_: Optional[list[str]] = SET,
):
    """Generate synthetic defect images, masks and a sharded manifest."""
    from defectforge.params.file import parse_params
    from defectforge.pipeline import generate as stage

    p = _params(params, set_).generate
    _kind(split, "split", "generate --split")
    _out_folder(out, "generate output", split, checkpoints)
    if method:
        p = parse_params({"generate": {**p.model_dump(), "methods": list(method)}}, "command line").generate
    _summary(stage.run(p, split, out, checkpoints=checkpoints))


@app.command()
def refine(split: Path = SPLIT, generated: Path = typer.Option(..., help="the generate command's folder"),
           out: Path = typer.Option(..., help="refined folder to write"), params: Path = PARAMS, set_: Optional[list[str]] = SET):
    """Refine the masks (Eq. 13 from attention; raw target mask otherwise)."""
    from defectforge.pipeline import refine as stage

    p = _checked("refine", params, set_, out, "refine output folder", generated, split=split)
    _summary(stage.run(p, split, generated, out))


@app.command()
def quality(split: Path = SPLIT, refined: Path = REFINED, out: Path = typer.Option(..., help="quality folder to write"),
            params: Path = PARAMS, set_: Optional[list[str]] = SET):
    """Per-sample gates, FID/KID/LPIPS and realism scores; exit 2 when a set-level gate fails."""
    from defectforge.pipeline import quality as stage

    p = _checked("quality", params, set_, out, "quality folder", refined, split=split, refined=refined)
    m = stage.run(p, split, refined, out)
    typer.echo(f"{out}: {m['samples']} samples, pass rate {m['pass_rate']}")


@app.command()
def detector(
    split: Path = SPLIT,
    refined: Path = REFINED,
    qc: Optional[Path] = typer.Option(None, help="the quality command's qc.parquet (default: no quality filter)"),
    out: Path = typer.Option(..., help="detector folder to write"),
    params: Path = PARAMS,
    set_: Optional[list[str]] = SET,
):
    """Train the detector real-only and real + synthetic (paired seeds); verdicts with 95 % intervals."""
    from defectforge.pipeline import detector as stage

    p = _checked("detector", params, set_, out, "detector folder", refined, qc, split=split, refined=refined)
    d = stage.run(p, split, refined, qc, out)
    for r in d["comparisons"]:
        if r.get("defect_type") == "all":
            typer.echo(f"{r['category']}/{r['method']} {r['metric']}: {r['verdict']} (protocol {r['protocol']} vs {r['reference']}, budget {r['budget']})")


@app.command()
def release(
    refined: Path = typer.Option(..., "--refined", "--generated", help="the refine (or generate) command's manifest"),
    out: Path = typer.Option(..., help="release folder to write"),
    quality: Optional[Path] = typer.Option(None, help="the quality command's folder"),
    detector: Optional[Path] = typer.Option(None, help="the detector command's folder"),
    split: Optional[Path] = typer.Option(None, help="split manifest (for the report's real columns)"),
    verify: bool = typer.Option(True, help="check every row's image/mask sha256 against its file first"),
    params: Path = PARAMS,
    set_: Optional[list[str]] = SET,
):
    """Write the versioned manifest, metrics, report and dataset card."""
    from defectforge.pipeline import release as stage

    p = _params(params, set_).release
    _out_folder(out, "release folder", refined, quality, detector, split)
    _summary(stage.run(p, refined, out, quality=quality, detector=detector, split=split, verify=verify))


@app.command()
def validate(
    manifest: Path = typer.Argument(..., metavar="MANIFEST", help="manifest file or shard folder"),
    hashes: bool = typer.Option(True, "--hashes/--no-hashes", help="re-hash every row's files against image_sha256/mask_sha256 (parallel); skip with --no-hashes"),
    within: Optional[Path] = typer.Option(None, help="folder the manifest's dataset root must be in (default: a root above the "
                                          "manifest's project or through a symlink out of it is refused)"),
):
    """Run the Great Expectations suite on a manifest; exit 1 listing failures, exit 2 when a file's bytes do not match its
    hash or the generate output it reads is half-made (a planned shard missing)."""
    from defectforge.manifest.paths import check_root
    from defectforge.manifest.validate import check_complete, check_hashes, validate_manifest

    try:
        check_root(manifest, within)  # the files it names are read only where they belong
        check_complete(manifest)
        failures = validate_manifest(manifest)
    except DefectforgeError as exc:
        if str(manifest) in str(exc):
            raise
        raise type(exc)(f"{manifest}: {exc}") from None
    if failures:
        typer.echo(f"{manifest}: {len(failures)} expectation(s) failed:", err=True)
        for f in failures:
            typer.echo(f"  - {f}", err=True)
        raise typer.Exit(1)
    if hashes:
        check_hashes(manifest)  # ManifestError naming the manifest, rows and files: exit 2
    _summary(manifest)


@app.command()
def verify(
    path: Path = typer.Argument(..., help="a copied version's folder (holding manifest.parquet, e.g. from dvc get), a manifest file or shard folder"),
    within: Optional[Path] = typer.Option(None, help="folder the manifest's dataset root must be in (see validate)"),
):
    """Check that every file a manifest names still hashes to its image_sha256 / mask_sha256 (exit 2 naming the rows that differ)."""
    from defectforge.manifest.io import read_manifest
    from defectforge.manifest.paths import check_root
    from defectforge.manifest.validate import check_complete, check_hashes

    manifest = path / "manifest.parquet" if path.is_dir() and (path / "manifest.parquet").is_file() else path
    check_root(manifest, within)
    check_complete(manifest)
    check_hashes(manifest)  # ManifestError naming the manifest, rows and files: exit 2
    typer.echo(f"{manifest}: {read_manifest(manifest, columns=['image_path']).num_rows} rows, every file matches its sha256")


@app.command()
def publish(
    name: Optional[str] = typer.Option(None, help="dataset name (default: params release.name)"),
    repo: Path = typer.Option(Path("."), help="the DVC project"),
    push: bool = typer.Option(True, help="dvc push of the version only (a default DVC remote in the committed .dvc/config is required) "
                              "and git push of the branch and tag; --no-push: local only (a later plain publish pushes it)"),
    private_remote: bool = typer.Option(False, help="push to a default DVC remote that is not in the committed .dvc/config "
                                        "(.dvc/config.local); consumers then pass remote=URL to defectforge.load"),
    params: Path = PARAMS,
):
    """Publish data/release as the next numbered version (git tag + dvc push); no change, no version (but what is not pushed yet is pushed)."""
    from defectforge.publish.versions import publish as _publish

    name = name or _params(repo / params if not params.is_absolute() else params).release.name
    r = _publish(repo, name, push=push, private_remote=private_remote)
    typer.echo(f"{'published' if r.created else 'unchanged, still'} {r.name} v{r.version} ({r.tag})")
    for line in r.notes:
        typer.echo(f"  {line}")
    for line in r.pushed:
        typer.echo(f"  pushed: {line}")
    if push and not r.pushed:
        typer.echo("  pushed: nothing (already on the remotes)")
    if not push:
        typer.echo("  not pushed (--no-push): `defectforge publish` again pushes the version's data and its tag")


@app.command("list-versions")
def list_versions(name: Optional[str] = typer.Argument(None), repo: Path = typer.Option(Path("."))):
    """Show the published dataset versions with their counts and headline metrics."""
    from defectforge.publish.versions import format_versions, list_versions as _list

    rows = _list(repo, name)
    if not rows:
        typer.echo("no published versions")
        return
    for line in format_versions(rows):
        typer.echo(line)


@app.command()
def doctor(repo: Path = typer.Option(Path("."), help="the checkout a worker runs in")):
    """Check what a Prefect worker needs: venv on PATH, git and DVC remotes, worker Python, API, GPU."""
    from defectforge.doctor import run

    raise typer.Exit(run(repo))


def _summary(path: Path) -> None:
    from defectforge.manifest.io import manifest_info, read_manifest

    info = manifest_info(path)
    df = read_manifest(path).to_pandas()
    typer.echo(f"{path}: {info['kind']} manifest, {len(df)} rows, valid")
    if "defect_type" in df:
        counts = df.groupby(["category", "defect_type"]).size()
        for (c, d), n in counts.items():
            typer.echo(f"  {c}/{d}: {n}")


MAX_ERROR = 1000  # characters of the error line
MAX_DETAILS = 50  # lines listed under it (an error with ``details``: every bad sample); the rest are in the file it names


def _report(exc: DefectforgeError) -> None:
    """``error: <one line>`` on stderr, then the error's ``details`` (if any), one per line, indented.

    A progress bar still open is closed first: the error line starts a line of its own."""
    end_progress_lines()
    line = str(exc)
    if len(line) > MAX_ERROR:
        line = line[: MAX_ERROR - 3] + "..."
    print(f"error: {line}", file=sys.stderr)
    details = list(getattr(exc, "details", None) or ())
    for d in details[:MAX_DETAILS]:
        print(f"  {' '.join(str(d).split())[:MAX_ERROR]}", file=sys.stderr)
    if len(details) > MAX_DETAILS:
        print(f"  ... and {len(details) - MAX_DETAILS} more", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="defectforge")
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except DefectforgeError as exc:
        _report(exc)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors
        usage, click_error, abort = _click_exceptions()
        if isinstance(exc, usage) and type(exc).__name__ != "NoArgsIsHelpError":  # no arguments at all: the help
            print(usage_line(exc), file=sys.stderr)
            sys.exit(exc.exit_code)
        if isinstance(exc, click_error):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, abort):
            sys.exit(130)
        raise


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(UsageError, ClickException, Abort) classes of click and of the copy of click that typer
    vendors (``typer._click``, typer >= 0.26): typer raises its own, which click's do not catch."""
    import click

    mods = [click.exceptions]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None and vendored is not click.exceptions:
        mods.append(vendored)
    return (tuple(m.UsageError for m in mods), tuple(m.ClickException for m in mods),
            tuple(m.Abort for m in mods if hasattr(m, "Abort")))


def usage_line(exc) -> str:
    """A usage error in one line: ``error: <what> (usage: defectforge validate [OPTIONS] MANIFEST; --help for more)``."""
    msg = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if ctx is None:
        return f"error: {msg}"
    usage = " ".join(ctx.get_usage().split())
    usage = usage[len("Usage: "):] if usage.startswith("Usage: ") else usage
    return f"error: {msg} (usage: {usage}; {ctx.command_path} --help for more)"


if __name__ == "__main__":
    main()

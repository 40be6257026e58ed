"""Stage ``generate``: plan samples, run each method shard by shard, write the manifest.

:func:`run` is the stage: every method of ``generate.methods`` into ``<out>/<method>/``
under one dataset root, locally (:func:`run_method`) or fanned out on Dask
(:mod:`defectforge.pipeline.fanout`, when ``generate.workers > 1`` or a
``generate.scheduler`` is set). Method objects come from the registry
(:mod:`defectforge.methods`) with their ``generate.<method>`` config.

The plan is a pure function of the split manifest and the params: for every defect
type of the training split, ``n_per_defect`` samples, each with its own normal image
(a defect-free *training* image of the same category), its own seed and a
``sample_id`` that hashes everything that determines the sample - the SHA-256 of the
normal image and of the real defects it learns from included, so a source replaced by
another image (even of the same size) is a new sample, never a reused one. Samples are cut
into shards of ``shard_size``; each shard is written (images, masks, then its
manifest part) and committed by an atomic rename, so a killed run resumes by
skipping finished shards and never duplicates rows. Held-out (test) images are never
used here: they belong to the detector's evaluation. Every source file read is checked
against the split manifest's hash (a file changed after ingest is refused, not silently
used under its old hash).

Batches (``generate.batch_size``): a diffusion method's batched UNet call gives each sample
the same random draws as batch 1 (its own generator) but not the same floating-point sums:
on the tiny UNet on CPU the eps rows of a batch of 8 differ from batch 1 by up to 2.5e-6
(bitwise equal between batches 4 and 8, and independent of the neighbours' values and of
the row's position), which after sampling moves about one pixel in a thousand by one uint8
level. So a sample's bytes may depend on the batch it shared, and the batch is part of
what determines it: batches are the consecutive samples of one defect type within a shard,
at most ``batch_size`` of them, so their make-up is a function of the plan, ``shard_size``
and ``batch_size`` only; ``shard_size`` already enters every sample id, and ``batch_size``
> 1 enters the diffusion methods' params hash (:meth:`GenerateParams.method_sha256`), so a
changed batch size makes new ids and is never resumed over, while a resumed or fanned-out
shard forms exactly the batches of an uninterrupted run and writes the same bytes.
``batch_size`` 1 calls ``method.generate`` per sample, exactly as before, and leaves the ids
as they were; the model-free methods loop over ``generate``, so their ids never depend on it.

Safety: the output root must be new, empty or made by defectforge (its ``.defectforge``
marker), must not overlap the dataset root it reads, and the split is checked before
anything under it is created or removed.
"""

from __future__ import annotations

import datetime
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from defectforge.data.codec import encode_png, read_image, read_mask
from defectforge.data.files import (
    OWNED,
    atomic_write_bytes,
    check_apart,
    claim_dir,
    owned_marker_text,
    sha256_bytes,
    sha256_file,
    umask_mode,
)
from defectforge.errors import DataError, OutputError, ParamsError, writing
from defectforge.manifest.io import ShardedWriter, manifest_info, read_manifest
from defectforge.manifest.validate import PLAN_FILE, check_complete, check_manifest, write_plan_info
from defectforge.masks.target import LocationPrior, sample_target_mask
from defectforge.methods import GenerationMethod, get_method_class
from defectforge.params.generate import METHOD_NEEDS_CHECKPOINTS, GenerateParams
from defectforge.seeding import derive_seed

ROOT_WHAT = "generate output folder"  # what the root's marker says it is


def run(
    p: GenerateParams, split: str | os.PathLike, out_dir: str | os.PathLike, *, checkpoints: str | os.PathLike | None = None, progress: bool = True
) -> Path:
    """Generate with every method of ``generate.methods`` into ``out_dir/<method>/``; returns ``out_dir``.

    One dataset root (``out_dir``) holds all methods; it is returned after the manifest
    suite passed. The stage stays one DVC stage however many machines do the work, so
    there is one ``dvc repro`` and one workspace lock. A method folder of an earlier run
    that ``generate.methods`` no longer asks for is removed - only if defectforge made it.
    Nothing but the folder and its lock file (:func:`lock_output`: a second run into the same
    folder refuses, naming this one) is created, and nothing removed, before the output folder
    is claimed and the split manifest planned without error. A run that fails before it commits
    a shard removes what it made (:func:`_undo_uncommitted`); a full disk is one line.
    """
    out_root = Path(out_dir)
    p.check_precision()  # fp16 without CUDA, in one line before anything is written
    _claim_root(out_root)  # refuse a user's folder before even reading the split
    existed = out_root.is_dir()
    fresh = not existed or not any(c.name != LOCK_FILE for c in out_root.iterdir())
    before = {c.name for c in out_root.iterdir() if c.is_dir()} if existed else set()
    with writing(out_root, "generate output", "free space (or give an --out on another device) and rerun the same "
                 "command: committed shards are kept"), lock_output(out_root, "generate"):
        try:
            _run(p, split, out_root, checkpoints, progress)
        except BaseException:
            _undo_uncommitted(out_root, p.methods, fresh=fresh, existed=existed, before=before)
            raise
    return out_root


def _run(p: GenerateParams, split, out_root: Path, checkpoints, progress: bool) -> None:
    src_root = read_split_info(split)["dataset_root"]
    _claim_root(out_root, inputs=(src_root,))
    split_df = read_manifest(split).to_pandas()
    _check_placements(p, split_df)
    if p.scheduler:  # an address where no scheduler listens, in one line before anything is written
        from defectforge.pipeline.fanout import check_scheduler

        check_scheduler(p.scheduler)
    if p.uses_generated_masks():  # every such type's mask model, before anything is written
        _check_mask_models(split_df, checkpoints, p.placement_for)
    if "defectdiffu" in p.methods and checkpoints is not None:  # its mask source against each type's fine-tune
        _check_defectdiffu_masks(p.defectdiffu.mask_source, split_df, checkpoints)
    _check_checkpoints(p, split_df, checkpoints)
    plans = []
    for name in p.methods:  # a bad split fails here, before anything is written
        plans.append(plan_method(p, name, split_df, checkpoints))
        claim_dir(out_root / name, f"generate method folder of {name}", markers=(PLAN_FILE,))
    _mark_root(out_root)
    for child in sorted(out_root.iterdir()):
        if child.is_dir() and not child.is_symlink() and child.name not in p.methods and (child / PLAN_FILE).is_file():
            shutil.rmtree(child)
    for plan in plans:
        if p.workers > 1 or p.scheduler:
            from defectforge.pipeline.fanout import run_on_dask

            n_shards = prepare_output(split, out_root / plan.name, plan)
            run_on_dask(run_plan, (plan, str(split), str(out_root)), n_shards, workers=p.workers, scheduler=p.scheduler,
                        desc=f"generate[{plan.name}]", progress=progress)
        else:
            run_plan(plan, split, out_root, progress=progress)
    check_complete(out_root)  # a shard file outside the plan (junk named like a shard) is named in one line
    check_manifest(out_root)


def _committed(method_dir: Path) -> bool:
    return any((method_dir / "manifest").glob("part-*.parquet"))


def _undo_uncommitted(out_root: Path, methods, *, fresh: bool, existed: bool, before: set[str]) -> None:
    """After a failed run: remove what it made that holds no committed shard, so a run that
    failed before finishing one shard (disk full, a bad --checkpoints) leaves no plan file,
    empty manifest folder or orphan images that look like a started output.

    A method folder this run created is removed unless a shard of it was committed (then it is
    a half-made output that resumes, and release/validate say so); a root that was new is removed,
    one that was empty emptied, when no method folder in it committed anything. Older folders are
    left as they were.
    """
    if not out_root.is_dir() or out_root.is_symlink():
        return
    nothing = not any(c.is_dir() and _committed(c) for c in out_root.iterdir() if not c.is_symlink())
    if not existed and nothing:
        shutil.rmtree(out_root, ignore_errors=True)  # its lock file too: the lock's context tolerates that
        return
    made = [out_root / m for m in methods if m not in before and (out_root / m).is_dir()]
    for d in made:
        if not _committed(d):
            shutil.rmtree(d, ignore_errors=True)
    if fresh and nothing:
        for c in out_root.iterdir():
            if c.name == LOCK_FILE:
                continue  # the lock's own context removes it
            shutil.rmtree(c, ignore_errors=True) if c.is_dir() and not c.is_symlink() else c.unlink(missing_ok=True)


LOCK_FILE = ".defectforge.lock"  # in a generate output folder while a run writes into it


@contextmanager
def lock_output(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing) while a ``what`` run writes into it.

    The lock is ``flock`` on ``folder/.defectforge.lock``, which records the holder (pid, host,
    start time); a second run into the same folder refuses at once with one line naming the
    holder. The kernel drops the lock when the process dies (kill -9 included), so a stale
    file never blocks a resume. The file is removed when the run ends, so it is never part
    of the output.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, umask_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise OutputError(f"{folder}: another {what} run is writing into this folder ({holder}); wait for it to "
                              "finish, or give another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and lock: lock the new one
    try:
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": started}).encode() + b"\n")
        yield
    finally:
        try:
            path.unlink(missing_ok=True)  # still locked: a run that opened it meanwhile retries on the new file
        finally:
            os.close(fd)


def _lock_holder(fd: int) -> str:
    """The holder recorded in a lock file, as words ("pid 12, host h, started 2026-11-02T10:00:00Z")."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        return f"held by pid {int(info['pid'])} on host {str(info['host'])[:100]}, started {str(info['started'])[:40]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder has not recorded itself yet"


def _check_checkpoints(p: GenerateParams, split: pd.DataFrame, checkpoints) -> None:
    """Every method that paints with fine-tuned models finds the finetune folder's index and a
    checkpoint for each defect type of the split, before anything is written."""
    from defectforge.diffusion.sampling import CHECKPOINT_INDEX

    needs = [m for m in p.methods if METHOD_NEEDS_CHECKPOINTS.get(m)]
    if not needs:
        return
    if checkpoints is None:
        raise DataError(f"generate: method {needs[0]!r} needs the finetune stage's checkpoints (--checkpoints)")
    index = Path(checkpoints) / CHECKPOINT_INDEX
    if not Path(checkpoints).is_dir() or not index.is_file():
        raise DataError(f"{checkpoints}: no fine-tuned checkpoints here (no {CHECKPOINT_INDEX}); --checkpoints must be the "
                        f"folder the finetune command wrote (method {needs[0]} needs it)")
    try:
        have = json.loads(index.read_text())
        if not isinstance(have, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as exc:
        raise DataError(f"{index}: unreadable checkpoint index ({exc.__class__.__name__}); run finetune again") from None
    missing = [f"{c}/{d}" for c, d in _train_types(split) if f"{c}/{d}" not in have]
    if missing:
        raise DataError(f"{index}: no fine-tuned checkpoint for {', '.join(missing[:5])}"
                        f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} of the split; run finetune on this split")


def _hashed_placement(p: GenerateParams) -> str:
    """What :func:`models_sha256` needs to know of the placement: whether mask models are read."""
    return "generated" if p.uses_generated_masks() else p.target_placement


def _check_placements(p: GenerateParams, split: pd.DataFrame) -> None:
    """Every key of ``target_placement_by_type`` names a defect type (or category/type) of the split."""
    types = split[split["defect_type"] != "good"]
    known = set(types["defect_type"]) | {f"{c}/{d}" for c, d in zip(types["category"], types["defect_type"])}
    unknown = sorted(set(p.target_placement_by_type) - known)
    if unknown:
        raise ParamsError(f"generate.target_placement_by_type: {', '.join(map(repr, unknown))} is not a defect type of the split "
                          f"(known: {', '.join(sorted(set(types['defect_type'])))})")


def _train_types(split: pd.DataFrame) -> list[tuple[str, str]]:
    """The (category, defect type) pairs with real training defects in the split, sorted."""
    train = split[(split["split"] == "train") & (split["defect_type"] != "good")]
    return sorted(set(zip(train["category"], train["defect_type"])))


def _check_defectdiffu_masks(mask_source: str, split: pd.DataFrame, checkpoints: str | os.PathLike) -> None:
    """``generate.defectdiffu.mask_source`` must fit every type's fine-tune: ``module`` needs its mask
    generation module (``finetune.mask_module`` > 0), ``attention`` a model without TDIA."""
    from defectforge.diffusion.models import FINETUNE_FILE

    for category, defect in _train_types(split):
        meta_path = Path(checkpoints) / category / defect / FINETUNE_FILE
        if not meta_path.is_file():
            continue  # a missing checkpoint is reported when the method loads it
        meta = json.loads(meta_path.read_text())
        if mask_source == "module" and not meta.get("mask_module"):
            raise ParamsError(f"generate.defectdiffu.mask_source: module needs finetune.mask_module > 0 ({meta_path} has no mask module)")
        if mask_source == "attention" and meta.get("tdia"):
            raise ParamsError(f"generate.defectdiffu.mask_source: attention does not work on a TDIA fine-tune ({meta_path}); "
                              "use module or target")


def _check_mask_models(split: pd.DataFrame, checkpoints: str | os.PathLike | None, placement_for=None) -> None:
    """``target_placement: generated`` needs a trained mask model for every defect type of the split
    whose placement (``placement_for(category, type)``, default: all of them) is ``generated``."""
    from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR, MASK_MODEL_META

    if checkpoints is None:
        raise ParamsError("generate.target_placement: generated needs the finetune folder with mask models (finetune.mask_model)")
    for category, defect in _train_types(split):
        if placement_for is not None and placement_for(category, defect) != "generated":
            continue
        folder = Path(checkpoints) / category / defect / MASK_MODEL_DIR
        if not (folder / MASK_MODEL_META).is_file():
            raise DataError(f"{folder}: no trained mask model for generate.target_placement: generated; "
                            "run finetune with finetune.mask_model: diffusion (or textual-inversion)")


def _claim_root(out_root: Path, inputs: tuple = ()) -> Path:
    """Refuse ``out_root`` unless it is new, empty or ours, and apart from ``inputs``; creates nothing.

    Ours: the marker, or (a folder of an older defectforge) nothing in it but method
    folders with a plan - a user's folder that merely holds one old method folder is not.
    """
    entries = [c for c in out_root.iterdir() if not c.name.startswith(".")] if out_root.is_dir() and not out_root.is_symlink() else []
    legacy = bool(entries) and all(c.is_dir() and not c.is_symlink() and (c / PLAN_FILE).is_file() for c in entries)
    check_apart(out_root, ROOT_WHAT, inputs)
    if out_root.is_dir() and not out_root.is_symlink() and {c.name for c in out_root.iterdir()} == {LOCK_FILE}:
        return out_root  # only a run's lock file (it made the folder and has not marked it yet): as good as empty
    return out_root if legacy else claim_dir(out_root, ROOT_WHAT)


def _mark_root(out_root: Path) -> None:
    out_root.mkdir(parents=True, exist_ok=True)
    if not (out_root / OWNED).is_file():
        atomic_write_bytes(out_root / OWNED, owned_marker_text(ROOT_WHAT).encode())


def read_split_info(split: str | os.PathLike) -> dict[str, str]:
    """``manifest_info`` of ``split``, refusing any other kind of manifest with one line."""
    info = manifest_info(split)
    if info["kind"] != "split":
        raise DataError(f"{split}: is a {info['kind']} manifest; generate needs the split stage's manifest (split.parquet)")
    return info


def build_method(p: GenerateParams, name: str, checkpoints: str | os.PathLike | None = None) -> GenerationMethod:
    """The configured method ``name`` as the stage runs it (diffusion methods need ``checkpoints``)."""
    method = get_method_class(name).for_stage(p.method_config(name), checkpoints)
    return method.set_precision(p.precision) if p.needs_checkpoints.get(name) else method  # generate.precision: the models' dtype


def run_method(
    p: GenerateParams, name: str, split, out_root, *, checkpoints: str | os.PathLike | None = None, progress: bool = True, shards: list[int] | None = None
) -> Path:
    """One method's samples (or some of its shards) into ``out_root/<name>/``, planned here (the
    stage plans once in :func:`run` and calls :func:`run_plan`); returns its shard folder."""
    split_df = read_manifest(split).to_pandas()
    if p.uses_generated_masks():
        _check_mask_models(split_df, checkpoints, p.placement_for)
    return run_plan(plan_method(p, name, split_df, checkpoints), split, out_root, progress=progress, shards=shards)


def run_plan(plan: "MethodPlan", split, out_root, *, progress: bool = True, shards: list[int] | None = None) -> Path:
    """A planned method's samples (or some of its shards) into ``out_root/<name>/``; returns its
    shard folder. A fan-out worker runs this with the driver's plan."""
    method = build_method(plan.params, plan.name, plan.checkpoints)
    return generate_shards(split, Path(out_root) / plan.name, plan, method, dataset_root=out_root, shards=shards, progress=progress)


@dataclass(frozen=True)
class SampleSpec:
    index: int
    sample_id: str
    category: str
    defect_type: str
    normal_id: str
    seed: int


@dataclass(frozen=True)
class MethodPlan:
    """One method's run, planned once by the driver and handed down whole (to the local run or,
    pickled, to every fan-out worker): the generate section, the method, its samples and the
    hashes their ids were made from."""

    params: GenerateParams
    name: str
    specs: tuple[SampleSpec, ...]
    params_sha256: str
    models_sha256: str = ""
    checkpoints: str | None = None  # the finetune folder (models and mask models), if any

    @property
    def n_shards(self) -> int:
        return (len(self.specs) + self.params.shard_size - 1) // self.params.shard_size

    def shard(self, index: int) -> tuple[SampleSpec, ...]:
        size = self.params.shard_size
        return self.specs[index * size : (index + 1) * size]

    @property
    def mask_models(self) -> str | None:
        """The folder of the types' mask models, when some type's target masks are generated."""
        return self.checkpoints if self.params.uses_generated_masks() else None


def plan_method(p: GenerateParams, name: str, split: pd.DataFrame, checkpoints: str | os.PathLike | None = None) -> MethodPlan:
    """The plan of method ``name`` on the split manifest's rows ``split`` (a pure function of them,
    the params and, for a method that paints with fine-tuned models, the finetune folder's content)."""
    params_sha256 = p.method_sha256(name)
    models = models_sha256(name, checkpoints, _hashed_placement(p))
    specs = plan_samples(split, method=name, n_per_defect=p.n_per_defect, seed=p.seed, params_sha256=params_sha256, models_sha256=models)
    return MethodPlan(p, name, tuple(specs), params_sha256, models, None if checkpoints is None else str(checkpoints))


def plan_samples(split: pd.DataFrame, *, method: str, n_per_defect: int, seed: int, params_sha256: str, models_sha256: str = "") -> list[SampleSpec]:
    """Deterministic list of the samples to make (same inputs -> same list).

    A sample's id hashes the content (SHA-256) of its normal image and of its defect
    type's real training defects (images and masks) beside the params and the package's
    code (:func:`package_sha256`), and, for a method
    that paints with fine-tuned models, the content of the finetune folder
    (:func:`models_sha256`), so a changed source file or a retrained model makes a new
    plan and the sample is generated again (the stage's output persists between runs).
    """
    train = split[split["split"] == "train"]
    specs: list[SampleSpec] = []
    sha = train.set_index("image_id")["image_sha256"]
    groups = train[train["defect_type"] != "good"].groupby(["category", "defect_type"], sort=True)
    for (category, defect), reals in groups:
        normals = sorted(train[(train["category"] == category) & (train["defect_type"] == "good")]["image_id"])
        if not normals:
            raise DataError(f"split manifest: category {category!r} has no defect-free training images to paint {defect!r} on")
        donors = hashlib.sha256(
            json.dumps(sorted(zip(reals["image_id"], reals["image_sha256"], reals["mask_sha256"].tolist()))).encode()
        ).hexdigest()
        for j in range(n_per_defect):
            s = derive_seed(seed, category, defect, j)
            normal = normals[s % len(normals)]
            key = f"{method}|{params_sha256}|{package_sha256(method)}|{category}|{defect}|{normal}|{sha[normal]}|{donors}|{s}" + (f"|{models_sha256}" if models_sha256 else "")
            sid = hashlib.sha256(key.encode()).hexdigest()[:20]
            specs.append(SampleSpec(len(specs), sid, category, defect, normal, s))
    if not specs:
        raise DataError("split manifest: no defect types in the training split, nothing to generate")
    return specs


@functools.lru_cache(maxsize=None)
def package_sha256(method: str) -> str:
    """The defectforge code that makes a sample of ``method``: the files of this stage module
    and of the method's own module or package, and what they import
    (:func:`defectforge.methods.code_sha256`), not the other methods'. Part of every sample id,
    so that after a code change DVC's rerun of this stage (whose output persists for resume)
    makes that method's samples again instead of keeping the old code's as done, while an edit
    to one method's files leaves the other methods' samples in place. Every such file is a
    dep of the stage in dvc.yaml (tests/project/test_dvc_deps.py), so an edit elsewhere (the report,
    say) changes no sample id and a from-scratch ``dvc repro`` matches the lock. Cached per
    process (one walk per method, not one per sample)."""
    from defectforge.methods import code_sha256

    return code_sha256(method, stage=__name__)


def models_sha256(name: str, checkpoints: str | os.PathLike | None, placement: str = "foreground") -> str:
    """The content of the finetune folder a method paints with ("" for the model-free
    methods, unless their target masks come from its mask models): SHA-256 over every
    file's relative path and SHA-256, in path order. DVC keeps generate's output between
    runs (``persist``) so killed runs resume; without this a retrained model would leave
    the old model's samples in place as "done"."""
    if not (METHOD_NEEDS_CHECKPOINTS.get(name) or placement == "generated") or checkpoints is None:
        return ""
    root = Path(checkpoints)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def prepare_output(split_manifest: str | os.PathLike, out_dir: str | os.PathLike, plan: MethodPlan) -> int:
    """Clear ``out_dir`` if it holds another plan's shards; returns the shard count.

    A distributed run calls this once in the driver before fanning out, so workers
    never race on clearing the folder.
    """
    read_split_info(split_manifest)
    _reset_if_plan_changed(Path(out_dir), plan.specs, plan.params.shard_size, split=split_manifest, root=Path(out_dir).parent,
                           checkpoints=plan.checkpoints)
    writer = ShardedWriter(Path(out_dir) / "manifest", kind="synthetic", dataset_root=out_dir, clean=True)  # stale temporaries, once
    _check_shard_files(writer, len(plan.specs), plan.params.shard_size)
    return plan.n_shards


def generate_shards(
    split_manifest: str | os.PathLike,
    out_dir: str | os.PathLike,
    plan: MethodPlan,
    method: GenerationMethod,
    *,
    shards: list[int] | None = None,
    progress: bool = True,
    dataset_root: str | os.PathLike | None = None,
) -> Path:
    """Generate every planned sample into ``out_dir`` (images/, masks/, raw_masks/, manifest/).

    ``plan`` (:func:`plan_method`) holds the samples and the generate section; ``method`` is the
    configured method object that makes them (:func:`build_method`).

    ``batch_size`` (``generate.batch_size``): consecutive samples of one defect type within a
    shard go to ``method.generate_batch`` together, at most ``batch_size`` at a time (1: one
    ``method.generate`` per sample). Batches never cross a shard, so a resumed or fanned-out
    shard forms the same batches as an uninterrupted run (module docstring).

    ``generate.target_placement`` places each target mask on the object's
    foreground, anywhere, or by the defect type's :class:`LocationPrior` (``prior``),
    learned from its real training masks; the row's ``mask_origin`` records it. With
    ``generated``, the type's mask model in the plan's finetune folder draws the
    mask, shape and place (AnomalyDiffusion Eq. 9, :mod:`defectforge.methods.anomalydiffusion.mask_model`);
    a model that draws only empty masks falls back to ``foreground`` and the row says so.
    ``target_placement_by_type`` ({"type" or "category/type": placement}) overrides
    ``target_placement`` for those types.

    ``method.prepare(category, defect_type, real_train_defects)`` readies the method for
    a defect type (loads its checkpoint, or remembers the donors). ``shards`` restricts
    the run to some shard indices (the fan-out of a distributed run); the default is all.
    ``dataset_root`` (default ``out_dir``) is the root the manifest's paths are relative
    to: the generate stage puts each method in ``<root>/<method>/`` under one root.
    Returns the manifest shard folder.

    The steps: :func:`_open_shards` (the folder, its writer and the shards left to do), then per
    shard :meth:`_ShardRun.shard_rows` - :meth:`~_ShardRun.enter_type` when the defect type
    changes, :meth:`~_ShardRun.target_for` per sample, :meth:`~_ShardRun.flush` per batch - and
    the shard's commit.
    """
    info = read_split_info(split_manifest)
    split = read_manifest(split_manifest).to_pandas()
    out_dir = Path(out_dir)
    root = Path(dataset_root) if dataset_root is not None else out_dir
    writer, todo = _open_shards(split_manifest, out_dir, plan, root, shards)
    sources = _SourceFiles(Path(info["dataset_root"]), split_manifest)
    run = _ShardRun(plan, method, out_dir, _relative_prefix(out_dir, root), split.set_index("image_id"), sources)
    bar = tqdm(total=sum(len(plan.shard(i)) for i in todo), desc=f"generate[{method.name}]", unit="img", disable=not progress)
    try:  # the bar's line is ended also on an error, so the error starts a line of its own
        for shard in todo:
            writer.write(shard, run.shard_rows(plan.shard(shard), bar))
    finally:
        bar.close()
    return writer.dir


def _open_shards(split_manifest, out_dir: Path, plan: MethodPlan, root: Path, shards: list[int] | None) -> tuple[ShardedWriter, list[int]]:
    """Ready ``out_dir`` for ``plan`` (cleared if it holds another plan's shards) and return its
    manifest writer and the shard indices still to do (of ``shards``, default all)."""
    _reset_if_plan_changed(out_dir, plan.specs, plan.params.shard_size, split=split_manifest, root=root, checkpoints=plan.checkpoints)
    # the whole run cleans stale temporaries; a fan-out worker (``shards`` given) leaves them to the driver
    writer = ShardedWriter(out_dir / "manifest", kind="synthetic", dataset_root=root, clean=shards is None)
    if shards is None:  # a fan-out's driver checked them once (prepare_output)
        _check_shard_files(writer, len(plan.specs), plan.params.shard_size)
    todo = [i for i in (shards if shards is not None else range(plan.n_shards)) if not writer.done(i)]
    return writer, todo


def _relative_prefix(out_dir: Path, root: Path) -> str:
    """The prefix of the manifest's paths: ``out_dir`` relative to the dataset ``root`` ("" when equal)."""
    prefix = Path(os.path.relpath(out_dir.resolve(), root.resolve())).as_posix()
    return "" if prefix == "." else prefix + "/"


@dataclass
class _SourceFiles:
    """The split's source files under ``root``, each checked once against the split's hash before use."""

    root: Path
    split_manifest: str | os.PathLike
    verified: set[str] = field(default_factory=set)

    def checked(self, rel: str, expected: str | None) -> Path:
        """The source file ``rel``, after checking its bytes still hash to the split's value."""
        path = self.root / rel
        if rel not in self.verified and expected is not None and path.is_file():
            if sha256_file(path) != expected:
                raise DataError(f"{path}: source file changed since ingest (its SHA-256 differs from {self.split_manifest}); "
                                "run ingest and split again")
            self.verified.add(rel)
        return path


class _ShardRun:
    """The state of one method's run over its shards: the real defects read so far (per defect
    type), and the defect type the method is prepared for, with its placement and its location
    prior or mask model."""

    def __init__(self, plan: MethodPlan, method: GenerationMethod, out_dir: Path, prefix: str, by_id: pd.DataFrame,
                 sources: _SourceFiles) -> None:
        self.plan, self.method, self.out_dir, self.prefix, self.by_id, self.sources = plan, method, out_dir, prefix, by_id, sources
        self.cfg_json = json.dumps(method.config.to_dict(), sort_keys=True, default=str)
        self.real_defects: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
        self.real_ids: dict[tuple[str, str], list[str]] = {}  # the image ids of real_defects, same order
        self.current: tuple[str, str] | None = None
        self.prior: LocationPrior | None = None
        self.mask_model = None
        self.type_placement = plan.params.target_placement

    def shard_rows(self, specs: tuple[SampleSpec, ...], bar) -> list[dict]:
        """The manifest rows of one shard's samples, generated (and their files written) in
        batches of consecutive samples of one type, at most ``batch_size`` each."""
        rows: list[dict] = []
        pending: list[tuple] = []
        for spec in specs:
            key = (spec.category, spec.defect_type)
            if pending and (key != self.current or len(pending) == self.plan.params.batch_size):
                self.flush(pending, rows, bar)
            self.enter_type(key)
            normal_row = self.by_id.loc[spec.normal_id]
            normal = read_image(self.sources.checked(normal_row.image_path, normal_row.image_sha256))
            target, placed = self.target_for(spec, normal)
            pending.append((spec, normal, target, placed, normal_row, key))
        if pending:
            self.flush(pending, rows, bar)
        return rows

    def enter_type(self, key: tuple[str, str]) -> None:
        """Read the type's real training defects (once), and (re)fit whenever the defect type
        changes, so any shard order is right: the method, the placement, its prior or mask model."""
        category, defect = key
        if key not in self.real_defects:
            by_id = self.by_id
            reals = by_id[(by_id["split"] == "train") & (by_id["category"] == category) & (by_id["defect_type"] == defect)]
            self.real_defects[key] = [
                (read_image(self.sources.checked(r.image_path, r.image_sha256)), read_mask(self.sources.checked(r.mask_path, r.mask_sha256)))
                for r in reals.itertuples()
            ]
            self.real_ids[key] = [str(i) for i in reals.index]
        if key == self.current:
            return
        reals = self.real_defects[key]
        self.method.prepare(category, defect, reals)
        self.type_placement = self.plan.params.placement_for(*key)
        self.prior = LocationPrior.fit([m for _, m in reals], [i for i, _ in reals]) if self.type_placement == "prior" else None
        self.mask_model = None
        if self.type_placement == "generated":
            from defectforge.methods.anomalydiffusion.mask_model import MASK_MODEL_DIR, load_mask_model

            self.mask_model = load_mask_model(Path(self.plan.mask_models) / category / defect / MASK_MODEL_DIR)
        self.current = key

    def target_for(self, spec: SampleSpec, normal: np.ndarray) -> tuple[np.ndarray, str]:
        """The sample's target mask and how it was placed: drawn by the type's mask model, or (none,
        or it drew no mask) an augmented real mask placed by the type's placement."""
        rng = np.random.default_rng(spec.seed)
        target, placed = None, self.type_placement
        if self.mask_model is not None:
            target = self.mask_model.sample(normal.shape[:2], spec.seed)
            placed = f"generated/{self.mask_model.kind}" if target is not None else "foreground (mask model drew no mask inside the real shape range)"
        if target is None:
            placement = self.type_placement if self.type_placement != "generated" else "foreground"
            target, _ = sample_target_mask([m for _, m in self.real_defects[(spec.category, spec.defect_type)]], normal, rng,
                                           placement=placement, prior=self.prior, **self.method.target_mask_options())
        return target, placed

    def flush(self, pending: list, rows: list, bar) -> None:
        """Generate the pending samples (one type) together and append their manifest rows in plan order."""
        from defectforge.methods.base import BatchItem

        method = self.method
        if len(pending) == 1:
            spec, normal, target, _, _, _ = pending[0]
            results = [method.generate(normal, target, spec.defect_type, spec.seed)]
        else:
            results = method.generate_batch([BatchItem(normal, target, spec.defect_type, spec.seed) for spec, normal, target, *_ in pending])
        for (spec, _, target, placed, normal_row, key), result in zip(pending, results):
            src = result.metadata.get("defect_source_index")  # a method that pastes a real defect says which
            rows.append(_write_sample(self.out_dir, self.prefix, spec, normal_row, result, method, self.cfg_json, self.plan.params_sha256,
                                      defect_source_id=self.real_ids[key][src] if src is not None else None,
                                      mask_origin=self.mask_origin(result, target, placed)))
            bar.update(1)
        pending.clear()

    def mask_origin(self, result, target: np.ndarray, placed: str) -> str | None:
        """The row's ``mask_origin``: the method's own word when it makes its masks, else how the
        target mask was placed."""
        if self.method.own_mask:
            return self.method.mask_origin_of(result)
        if not placed.startswith("generated/"):
            return f"augmented-real/{placed}"
        # a method that pastes a real shape (copy-paste) only takes the generated mask's place
        return placed if np.array_equal(result.mask, target) else f"augmented-real/centred on {placed}"


def _check_shard_files(writer: ShardedWriter, samples: int, shard_size: int) -> None:
    """Every file named like a shard is a committed shard of this plan (readable, its planned row
    count, its index planned); a junk file in its place would be skipped as done, or read as
    rows. Refused with one line naming the file, before anything is generated."""
    import pyarrow.parquet as pq

    n = (samples + shard_size - 1) // shard_size
    for f in writer.shards():
        index = f.name[len("part-"): -len(".parquet")]
        if not index.isdigit() or int(index) >= n:
            raise DataError(f"{f}: a file named like a manifest shard outside this run's plan of {n} shard(s); "
                            "generate did not write it - remove it and rerun")
        try:
            rows = pq.read_metadata(f).num_rows
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid / OSError for a file that is not Parquet
            raise DataError(f"{f}: named like a manifest shard but not a readable Parquet file ({exc.__class__.__name__}); "
                            "generate did not write it - remove it and rerun (the shard is made again)") from None
        expected = min(shard_size, samples - int(index) * shard_size)
        if rows != expected:
            raise DataError(f"{f}: a manifest shard of {rows} rows where this plan has {expected}; generate did not write "
                            "it - remove it and rerun (the shard is made again)")


def _reset_if_plan_changed(out_dir: Path, specs: list[SampleSpec], shard_size: int, *, split=None, root=None, checkpoints=None) -> None:
    """Finished shards are reused only by a run with the same plan; otherwise start clean.

    Only a folder that holds our plan file (or nothing) is cleared: anything else is refused.
    Beside the plan's hash, the shard count and the command that resumes the run are recorded
    (:func:`~defectforge.manifest.validate.write_plan_info`): release and validate refuse a folder
    with a planned shard missing.
    """
    plan = hashlib.sha256(json.dumps([shard_size] + [s.sample_id for s in specs]).encode()).hexdigest()
    marker = out_dir / PLAN_FILE
    claim_dir(out_dir, "generate method folder", markers=(PLAN_FILE,))
    if out_dir.exists() and (not marker.is_file() or marker.read_text().strip() != plan):
        for child in ("manifest", "images", "masks", "raw_masks", "attention"):
            shutil.rmtree(out_dir / child, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_plan_info(out_dir, plan_sha256=plan, samples=len(specs), shard_size=shard_size, split=split, root=root, checkpoints=checkpoints)
    atomic_write_bytes(marker, (plan + "\n").encode())


def _write_sample(out_dir: Path, prefix: str, spec: SampleSpec, normal_row, result, method, cfg_json: str, params_sha256: str,
                  defect_source_id: str | None = None, mask_origin: str | None = None) -> dict:
    if result.image.shape != (normal_row.height, normal_row.width, 3):
        raise DataError(f"method {method.name} returned an image of shape {result.image.shape} for {spec.normal_id}")
    if not np.isfinite(result.image).all():
        raise DataError(f"method {method.name} returned non-finite pixels for sample {spec.sample_id}")
    sub = f"{spec.category}/{spec.defect_type}/{spec.sample_id}.png"
    files = {"image_path": f"images/{sub}", "mask_path": f"masks/{sub}", "raw_mask_path": f"raw_masks/{sub}"}
    hashes = {}
    for col, arr in (("image_path", result.image), ("mask_path", result.mask), ("raw_mask_path", result.mask)):
        data = encode_png(arr)
        atomic_write_bytes(out_dir / files[col], data)
        hashes[col] = sha256_bytes(data)
    files = {k: prefix + v for k, v in files.items()}
    attention_path = None
    if result.attention is not None:
        att = np.clip(np.rint(result.attention * 255), 0, 255).astype(np.uint8)
        atomic_write_bytes(out_dir / f"attention/{sub}", encode_png(att))
        attention_path = prefix + f"attention/{sub}"
    area = int(result.mask.sum())
    return {
        "sample_id": spec.sample_id,
        "dataset_version": None,
        "category": spec.category,
        "defect_type": spec.defect_type,
        "method": method.name,
        **files,
        "attention_path": attention_path,
        "source_image_id": spec.normal_id,
        "source_sha256": normal_row.image_sha256,
        "defect_source_id": defect_source_id,
        "mask_origin": mask_origin,
        "image_sha256": hashes["image_path"],
        "mask_sha256": hashes["mask_path"],
        "raw_mask_sha256": hashes["raw_mask_path"],
        "seed": spec.seed,
        "params_sha256": params_sha256,
        "checkpoint_sha256": method.checkpoint_for(spec.defect_type),
        "method_config": cfg_json,
        "width": int(normal_row.width),
        "height": int(normal_row.height),
        "mask_area": area,
        "raw_mask_area": area,
    }

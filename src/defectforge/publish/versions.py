"""Versioned releases: a git tag per dataset version, data on the DVC remote.

The DVC ``release`` stage writes a content-addressed release (``data/release``:
manifest, card, metrics). :func:`publish` turns it into a numbered version that data
teams consume:

1. compare its content hash with the latest published version of the same name -
   nothing changed, nothing published (same version returned, no new tag);
2. otherwise verify every row's image/mask hash, then build ``releases/<name>/v<N>/``:
   the manifest (``dataset_version = "<name>/v<N>"``, ``dataset_root = "."``), the card,
   metrics, report **and every file the manifest names** (images, masks, raw masks,
   attention maps, copied from ``data/generated`` / ``data/refined`` at the same relative
   paths; the DVC cache stores equal files once), so the folder is self-contained; track it with
   ``dvc add`` as its own ``releases/<name>/v<N>.dvc``; write the git-tracked summary
   ``releases/<name>/v<N>.json``;
3. commit the summary, the ``.dvc`` file, ``dvc.yaml``, ``dvc.lock``, ``params.yaml``
   and the git-tracked (``cache: false``) metric files of ``dvc.yaml``, tag the commit
   ``dataset/<name>/v<N>``;
4. with ``push`` (the default): ``dvc push`` (a DVC remote is required: without one the
   version's pixels would exist on this machine only), then ``git push`` of the branch
   and the tag to the branch's upstream remote (or ``origin``, or the only remote).

Consumers read a version with :func:`defectforge.load` (local or through ``dvc.api``
at the tag), ``dvc get <repo> releases/<name>/v<N> --rev dataset/<name>/v<N>``, or in a
clone with ``dvc pull releases/<name>/v<N>`` (that version only: no models, no other
stage outputs). ``defectforge list-versions`` shows the published versions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from defectforge.data.io import atomic_dir
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.schema import PATH_COLUMNS

TAG_PREFIX = "dataset"


def tag_name(name: str, version: int) -> str:
    return f"{TAG_PREFIX}/{name}/v{version}"


@dataclass(frozen=True)
class Published:
    name: str
    version: int
    tag: str
    created: bool
    summary: dict
    pushed: tuple[str, ...] = ()  # what was pushed: "dvc", "git <remote>"


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise DefectforgeError(f"{' '.join(cmd[:3])} failed in {cwd}: {tail[0]}")
    return r


def _git(repo: Path, *args: str, check: bool = True) -> str:
    return _run(["git", *args], repo, check).stdout.strip()


def _dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "dvc", *args], repo, check)


def list_versions(repo: str | os.PathLike, name: str | None = None) -> list[dict]:
    """Published versions (from the git tags ``dataset/<name>/v<N>``), oldest first."""
    repo = Path(repo)
    tags = _git(repo, "tag", "--list", f"{TAG_PREFIX}/*", check=False).splitlines()
    out = []
    for t in tags:
        m = re.fullmatch(rf"{TAG_PREFIX}/([a-z0-9][a-z0-9_-]*)/v(\d+)", t.strip())
        if not m or (name and m.group(1) != name):
            continue
        blob = _run(["git", "show", f"{t}:releases/{m.group(1)}/v{m.group(2)}.json"], repo, check=False)
        summary = json.loads(blob.stdout) if blob.returncode == 0 else {}
        out.append({"name": m.group(1), "version": int(m.group(2)), "tag": t, **summary})
    return sorted(out, key=lambda v: (v["name"], v["version"]))


def _git_tracked_outputs(repo: Path) -> list[str]:
    """The files ``dvc.yaml`` keeps in git (``cache: false`` outs, metrics and plots) that exist."""
    import yaml

    f = repo / "dvc.yaml"
    if not f.is_file():
        return []
    try:
        stages = (yaml.safe_load(f.read_text()) or {}).get("stages") or {}
    except yaml.YAMLError as exc:
        raise DefectforgeError(f"{f}: not valid YAML ({exc.__class__.__name__})") from None
    found: list[str] = []
    for stage in stages.values():
        if not isinstance(stage, dict):
            continue
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                if isinstance(entry, dict):
                    for path, opts in entry.items():
                        if isinstance(opts, dict) and opts.get("cache") is False and (repo / path).is_file():
                            found.append(path)
    return sorted(set(found))


def _copy(src: Path, dst: Path) -> None:
    """A copy, never a hard link: ``dvc add`` moves the file into the cache, and a link shared
    with ``data/generated`` would let an in-place edit there change a published version."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _copy_files(df, src_root: Path, dest: Path) -> int:
    """Every file the manifest names, from ``src_root`` to the same relative path under ``dest``."""
    n = 0
    real_root = os.path.realpath(src_root)
    for col in PATH_COLUMNS["synthetic"]:
        if col not in df.columns:
            continue
        for rel in sorted({str(p) for p in df[col].dropna()}):
            src = src_root / rel
            real = os.path.realpath(src)
            if os.path.commonpath([real, real_root]) != real_root:
                raise DefectforgeError(f"publish: {col} {src} resolves outside the dataset root {src_root}; refusing to copy it")
            if not os.path.isfile(real):
                raise DefectforgeError(f"publish: {col} {src} is missing; run `dvc repro` (or `dvc checkout`) first")
            _copy(Path(real), dest / rel)
            n += 1
    return n


def _push_remote(repo: Path) -> str | None:
    """The git remote to push to: the branch's upstream remote, else ``origin``, else the only remote."""
    remotes = _git(repo, "remote", check=False).split()
    if not remotes:
        return None
    branch = _git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    upstream = _git(repo, "config", f"branch.{branch}.remote", check=False) if branch else ""
    if upstream in remotes:
        return upstream
    if "origin" in remotes:
        return "origin"
    return remotes[0] if len(remotes) == 1 else None


def publish(
    repo: str | os.PathLike,
    name: str,
    *,
    release_dir: str = "data/release",
    push: bool = True,
) -> Published:
    """Publish ``release_dir`` of the DVC project ``repo`` as the next version of ``name``."""
    repo = Path(repo).resolve()
    rel = repo / release_dir
    info_file = rel / "release.json"
    if not info_file.is_file():
        raise DefectforgeError(f"{info_file}: no release to publish (run `dvc repro` first)")
    current = json.loads(info_file.read_text())
    content = current["dataset_version"].split("@")[-1]
    versions = list_versions(repo, name)
    if versions and versions[-1].get("content_hash") == content:
        last = versions[-1]
        return Published(name, last["version"], last["tag"], False, last)
    version = (versions[-1]["version"] + 1) if versions else 1
    if push and not _dvc(repo, "remote", "list").stdout.strip():
        raise DefectforgeError(f"{repo}: no DVC remote configured, so the version's images would exist only on this machine; "
                               "add one (`dvc remote add -d NAME URL`) or publish with --no-push")
    label = f"{name}/v{version}"
    target = repo / "releases" / name / f"v{version}"
    manifest = rel / "manifest.parquet"
    src_root = Path(manifest_info(manifest)["dataset_root"])
    df = read_manifest(manifest).to_pandas()
    from defectforge.pipeline.release import verify_hashes

    verify_hashes(df, src_root, source=str(manifest))
    with atomic_dir(target, "release version folder") as tmp:
        _copy_files(df, src_root, tmp)
        df["dataset_version"] = label
        # paths stay as they were, now relative to the version folder itself
        write_manifest(df, tmp / "manifest.parquet", kind="synthetic", dataset_root=tmp, dataset_version=label)
        from defectforge.manifest.validate import check_manifest

        check_manifest(tmp / "manifest.parquet")
        for extra in ("README.md", "metrics.json", "report.html"):
            if (rel / extra).is_file():
                shutil.copy2(rel / extra, tmp / extra)
    summary = {
        "name": name,
        "version": version,
        "dataset_version": label,
        "content_hash": content,
        "samples": current.get("samples"),
        "counts": current.get("counts"),
        "metrics": current.get("metrics", {}),
        "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (target.parent / f"v{version}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    _dvc(repo, "add", "-q", str(target.relative_to(repo)))
    files = [f"releases/{name}/v{version}.json", f"releases/{name}/v{version}.dvc", f"releases/{name}/.gitignore"]
    files += [f for f in ("dvc.yaml", "dvc.lock", "params.yaml") if (repo / f).is_file()]
    files += _git_tracked_outputs(repo)
    _git(repo, "add", "--", *files)
    _git(repo, "commit", "-q", "-m", f"Release dataset {label} ({summary['samples']} samples, {content})", "--", *files)
    tag = tag_name(name, version)
    _git(repo, "tag", "-a", tag, "-m", f"defectforge dataset {label}")
    pushed: list[str] = []
    if push:
        _dvc(repo, "push", "-q")
        pushed.append("dvc")
        remote = _push_remote(repo)
        if remote is not None:
            branch = _git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
            refs = ([f"refs/heads/{branch}:refs/heads/{branch}"] if branch else []) + [f"refs/tags/{tag}:refs/tags/{tag}"]
            _git(repo, "push", "-q", remote, *refs)
            pushed.append(f"git {remote}")
    return Published(name, version, tag, True, summary, tuple(pushed))

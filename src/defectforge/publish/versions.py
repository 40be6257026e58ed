"""Versioned releases: a git tag per dataset version, data on the DVC remote.

The DVC ``release`` stage writes a content-addressed release (``data/release``:
manifest, card, metrics). :func:`publish` turns it into a numbered version that data
teams consume:

1. compare its content hash with the latest published version of the same name -
   nothing changed, nothing published (same version returned, no new tag);
2. otherwise write ``releases/<name>/v<N>/`` (the manifest with
   ``dataset_version = "<name>/v<N>"``, the card, metrics, report) and track it with
   ``dvc add``; write the git-tracked summary ``releases/<name>/v<N>.json``;
3. commit ``dvc.lock`` and the release files, tag the commit ``dataset/<name>/v<N>``;
4. ``dvc push`` when a DVC remote is configured (images, masks and manifests).

Consumers read a version with :func:`defectforge.load` (local or through ``dvc.api``
at the tag) or with ``dvc get`` / ``dvc import``; ``defectforge list-versions`` shows
the published versions.
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

from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.validate import check_manifest

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
    label = f"{name}/v{version}"
    target = repo / "releases" / name / f"v{version}"
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    manifest = rel / "manifest.parquet"
    root = manifest_info(manifest)["dataset_root"]
    df = read_manifest(manifest).to_pandas()
    df["dataset_version"] = label
    write_manifest(df, target / "manifest.parquet", kind="synthetic", dataset_root=root, dataset_version=label)
    check_manifest(target / "manifest.parquet")
    for extra in ("README.md", "metrics.json", "report.html"):
        if (rel / extra).is_file():
            shutil.copy2(rel / extra, target / extra)
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
    if (repo / "dvc.lock").is_file():
        files.append("dvc.lock")
    _git(repo, "add", *files)
    _git(repo, "commit", "-q", "-m", f"Release dataset {label} ({summary['samples']} samples, {content})")
    tag = tag_name(name, version)
    _git(repo, "tag", "-a", tag, "-m", f"defectforge dataset {label}")
    if push and _dvc(repo, "remote", "list").stdout.strip():
        _dvc(repo, "push", "-q")
    return Published(name, version, tag, True, summary)

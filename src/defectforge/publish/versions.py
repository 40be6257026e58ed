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
4. with ``push`` (the default): ``dvc push`` of that version's ``.dvc`` output only (not the
   models or other stage outputs in the cache), then ``git push`` of the branch and the tag
   to the branch's upstream remote (or ``origin``, or the only remote).

A version must be readable from its tag alone, so the default DVC remote must be in the
committed ``.dvc/config``: when the working ``.dvc/config`` names a default remote that HEAD's
does not (``dvc remote add -d`` after the last commit), the release commit carries
``.dvc/config`` and says so; a default remote that lives only in ``.dvc/config.local`` (or
the global config), or a relative remote path, is refused unless ``private_remote`` (then
consumers pass the remote themselves: ``load(..., remote=URL)``, ``dvc get --remote-config
url=URL``). Publishing an unchanged release again pushes what is missing (its data, its tag):
a version made with ``push=False`` is pushed by the next plain publish. A detached HEAD is
refused; files of earlier versions deleted from the working tree are restored from HEAD, and
``releases/<name>/.gitignore`` keeps every earlier version's line.

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

from defectforge.data.files import atomic_dir
from defectforge.errors import DefectforgeError
from defectforge.manifest.io import manifest_info, read_manifest, write_manifest
from defectforge.manifest.schema import PATH_COLUMNS
from defectforge.publish.remotes import DefaultRemote, committed_default, working_default

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
    pushed: tuple[str, ...] = ()  # what was pushed, one line each ("dvc store: ...", "git origin: ...")
    notes: tuple[str, ...] = ()   # what publish did besides the version (config committed, files restored)


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


LINE_WIDTH = 120  # list-versions fits a terminal this wide
METRIC_LINES = 2  # lines of metrics under each version; the rest are counted, and are in releases/<name>/v<N>.json


def _metric_text(key: str, value) -> str:
    """``key=value`` of one numeric headline metric; the protocol / budget suffix of a mean key is dropped
    (every detector entry of a run has the same, and the version's JSON keeps it)."""
    return f"{key.split(' [', 1)[0]}={value:.3g}"


def format_versions(rows: list[dict], width: int = LINE_WIDTH) -> list[str]:
    """The lines of ``defectforge list-versions``: per version its tag, sample count, content hash and
    publication time, then its numeric headline metrics as whole ``key=value`` items wrapped on at most
    :data:`METRIC_LINES` indented lines of ``width`` columns; a value is never cut, the items that do not
    fit are counted at the end (``+N more in releases/<name>/v<N>.json``)."""
    out = []
    for v in rows:
        out.append(f"{v['tag']:<32} {v.get('samples', '?'):>6} samples  {v.get('content_hash', '')}  {v.get('published_at', '')}".rstrip())
        metrics = v.get("metrics") or {}
        items = [_metric_text(k, metrics[k]) for k in sorted(metrics)
                 if isinstance(metrics[k], (int, float)) and not isinstance(metrics[k], bool)]
        where = f"releases/{v.get('name', '?')}/v{v.get('version', '?')}.json"

        def fits(line: list[str], note: str = "") -> bool:
            return len("    " + ", ".join(line + ([note] if note else []))) <= width

        lines: list[list[str]] = [[]]
        shown = 0
        for i, item in enumerate(items):
            # on the last allowed line, room for the note counting what does not fit
            rest = len(items) - i - 1
            note = f"+{rest} more in {where}" if rest else ""
            if fits(lines[-1] + [item], note if len(lines) == METRIC_LINES else ""):
                lines[-1].append(item)
            elif len(lines) < METRIC_LINES and fits([item], note if len(lines) + 1 == METRIC_LINES else ""):
                lines.append([item])
            else:
                break
            shown += 1
        lines = [line for line in lines if line]
        if shown < len(items):
            note = f"+{len(items) - shown} more in {where}"
            if lines and fits(lines[-1], note):
                lines[-1].append(note)
            else:
                lines.append([note])
        out += ["    " + ", ".join(line) for line in lines]
    return out


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


def _branch(repo: Path) -> str:
    """The checked-out branch; a detached HEAD is refused (the release commit would belong to no branch)."""
    branch = _git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False)
    if not branch:
        at = _git(repo, "rev-parse", "--short", "HEAD", check=False) or "no commit"
        raise DefectforgeError(f"publish: HEAD is detached (at {at}, e.g. left by an interrupted `dvc exp run`); "
                               "check out your branch (git checkout main) and publish again")
    return branch


def _restore_deleted(repo: Path) -> list[str]:
    """Files under ``releases/`` (and ``.dvc/config``) that HEAD has and the working tree lost
    (``dvc exp apply`` deletes them), checked out again from HEAD: a later version never drops
    an earlier one's files."""
    if _run(["git", "rev-parse", "-q", "--verify", "HEAD"], repo, check=False).returncode != 0:
        return []
    gone = _git(repo, "diff", "--name-only", "--diff-filter=D", "HEAD", "--", "releases", ".dvc/config", check=False).splitlines()
    gone = [g for g in gone if g.strip()]
    # a working .dvc/config that lost HEAD's default remote (an older copy put back) would push nowhere
    if ".dvc/config" not in gone and committed_default(repo) is not None and working_default(repo) is None:
        gone.append(".dvc/config")
    if gone:
        _git(repo, "checkout", "HEAD", "--", *gone)
    return gone


def _keep_gitignore_lines(repo: Path, gitignore: str) -> None:
    """Add back every line HEAD's ``gitignore`` has that the working one lost (a rewrite by
    ``dvc add`` after the file was deleted keeps only the new version)."""
    r = _run(["git", "show", f"HEAD:{gitignore}"], repo, check=False)
    if r.returncode != 0:
        return
    f = repo / gitignore
    have = f.read_text().splitlines() if f.is_file() else []
    lost = [line for line in r.stdout.splitlines() if line.strip() and line not in have]
    if lost:
        f.write_text("\n".join(lost + have) + "\n")


def _remote_plan(repo: Path, push: bool, private_remote: bool) -> tuple[bool, str | None, list[str]]:
    """(commit ``.dvc/config``?, the DVC remote to push to, notes). Refuses a push whose tag
    would not say where the data is, unless ``private_remote``."""
    head = committed_default(repo)
    work = working_default(repo)
    local = working_default(repo, local=True)
    effective = local or work
    notes: list[str] = []
    commit_config = work is not None and bool(work.url) and work != head
    at_tag = work if commit_config else head
    if commit_config:
        notes.append(f"committed .dvc/config with the default DVC remote {work.name} ({work.url}): the tag alone locates the data")
    if not push:
        return commit_config, None, notes
    if effective is None:
        raise DefectforgeError(f"{repo}: no DVC remote configured, so the version's images would exist only on this machine; "
                               "add one (`dvc remote add -d NAME URL`) or publish with --no-push")
    if private_remote:
        if at_tag is None or at_tag.name != effective.name:
            notes.append(f"the DVC remote {effective.name} is not in the committed .dvc/config: consumers pass it themselves "
                         "(defectforge.load(..., remote=URL), dvc get --remote-config url=URL)")
        return commit_config, effective.name, notes
    where = ".dvc/config.local" if local is not None and local.name != getattr(work, "name", None) else "the global DVC config"
    if at_tag is None or not at_tag.url:
        raise DefectforgeError(f"publish: the default DVC remote {effective.name} is set in {where}, not in the committed .dvc/config, "
                               "so the tag would not say where the data is; add it to the project (dvc remote add -d --project NAME URL) "
                               "or publish with --private-remote (consumers then pass remote=URL to defectforge.load)")
    if not at_tag.portable:
        raise DefectforgeError(f"publish: the default DVC remote {at_tag.name} has the relative URL {at_tag.url!r}, which a consumer "
                               f"resolves inside its own copy; use an absolute path or URL (dvc remote modify {at_tag.name} url ...)")
    return commit_config, at_tag.name, notes


def _dvc_push(repo: Path, remote: str, dvcfile: str) -> str:
    """``dvc push -r remote dvcfile`` (that version only); one line saying what went where."""
    import yaml

    out = (yaml.safe_load((repo / dvcfile).read_text()) or {}).get("outs") or [{}]
    nfiles, size = out[0].get("nfiles"), out[0].get("size")
    r = _dvc(repo, "push", "-r", remote, dvcfile)
    said = [line.strip() for line in (r.stdout + r.stderr).splitlines() if re.search(r"pushed|up to date", line, re.I)]
    what = dvcfile[: -len(".dvc")]
    extent = f"{nfiles} files, {size} bytes" if nfiles is not None else f"{size} bytes"
    return f"dvc {remote}: {what} ({extent}): {said[-1] if said else 'done'}"


def _git_push(repo: Path, tag: str, branch: str | None) -> str | None:
    """Push ``tag`` (and ``branch``) to the push remote; what was pushed, or None without a git remote."""
    remote = _push_remote(repo)
    if remote is None:
        return None
    on_remote = _run(["git", "ls-remote", "--tags", remote, f"refs/tags/{tag}"], repo, check=False).stdout.strip()
    if branch:  # the branch only when the remote's differs from ours
        theirs = _run(["git", "ls-remote", "--heads", remote, f"refs/heads/{branch}"], repo, check=False).stdout.split()[:1]
        if theirs == [_git(repo, "rev-parse", branch, check=False)]:
            branch = None
    refs = [f"refs/heads/{branch}:refs/heads/{branch}"] if branch else []
    refs += [] if on_remote else [f"refs/tags/{tag}:refs/tags/{tag}"]
    if not refs:
        return None
    _git(repo, "push", "-q", remote, *refs)
    return f"git {remote}: " + ", ".join(r.split(":")[0].split("/", 2)[-1] for r in refs)


def _push_unchanged(repo: Path, name: str, last: dict, branch: str, private_remote: bool) -> Published:
    """An unchanged release already published as ``last``: push its data and tag where they are missing."""
    tag, version = last["tag"], last["version"]
    dvcfile = f"releases/{name}/v{version}.dvc"
    if not (repo / dvcfile).is_file():
        raise DefectforgeError(f"publish: {dvcfile} is not in the working tree, so {tag} cannot be pushed from here; "
                               f"run `git checkout {tag} -- {dvcfile} && dvc push {dvcfile} && git push origin {tag}`")
    at_tag = committed_default(repo, tag)
    notes: list[str] = []
    if at_tag is None or not at_tag.url:
        if not private_remote:
            raise DefectforgeError(f"publish: {tag} was committed without a default DVC remote in .dvc/config, so its data cannot "
                                   "be found from the tag; push it with --private-remote (consumers then pass remote=URL to "
                                   "defectforge.load) or publish a changed release as a new version")
        remote = (working_default(repo, local=True) or working_default(repo) or DefaultRemote("", "")).name
        if not remote:
            raise DefectforgeError(f"{repo}: no DVC remote configured to push {tag} to (dvc remote add -d NAME URL)")
        notes.append(f"{tag} names no DVC remote: consumers pass remote=URL to defectforge.load")
    else:
        remote = at_tag.name
    pushed = [_dvc_push(repo, remote, dvcfile)]
    # the branch goes too only when the tag is on it (pushing it otherwise is not this command's business)
    on_branch = _run(["git", "merge-base", "--is-ancestor", tag, branch], repo, check=False).returncode == 0
    g = _git_push(repo, tag, branch if on_branch else None)
    if g:
        pushed.append(g)
    return Published(name, version, tag, False, last, tuple(pushed), tuple(notes))


def publish(
    repo: str | os.PathLike,
    name: str,
    *,
    release_dir: str = "data/release",
    push: bool = True,
    private_remote: bool = False,
) -> Published:
    """Publish ``release_dir`` of the DVC project ``repo`` as the next version of ``name``."""
    repo = Path(repo).resolve()
    rel = repo / release_dir
    info_file = rel / "release.json"
    if not info_file.is_file():
        raise DefectforgeError(f"{info_file}: no release to publish (run `dvc repro` first)")
    branch = _branch(repo)
    current = json.loads(info_file.read_text())
    content = current["dataset_version"].split("@")[-1]
    restored = _restore_deleted(repo)
    versions = list_versions(repo, name)
    if versions and versions[-1].get("content_hash") == content:
        last = versions[-1]
        if not push:
            return Published(name, last["version"], last["tag"], False, last)
        done = _push_unchanged(repo, name, last, branch, private_remote)
        return Published(done.name, done.version, done.tag, False, done.summary, done.pushed,
                         tuple(f"restored from HEAD: {p}" for p in restored) + done.notes)
    version = (versions[-1]["version"] + 1) if versions else 1
    commit_config, dvc_remote, notes = _remote_plan(repo, push, private_remote)
    notes = [f"restored from HEAD: {p}" for p in restored] + notes
    label = f"{name}/v{version}"
    target = repo / "releases" / name / f"v{version}"
    manifest = rel / "manifest.parquet"
    src_root = Path(manifest_info(manifest)["dataset_root"])
    df = read_manifest(manifest).to_pandas()
    from defectforge.manifest.validate import require_hashes

    require_hashes(df, src_root, source=str(manifest))
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
    _keep_gitignore_lines(repo, f"releases/{name}/.gitignore")
    files = [f"releases/{name}/v{version}.json", f"releases/{name}/v{version}.dvc", f"releases/{name}/.gitignore"]
    files += [".dvc/config"] if commit_config else []
    files += [f for f in ("dvc.yaml", "dvc.lock", "params.yaml") if (repo / f).is_file()]
    files += _git_tracked_outputs(repo)
    _git(repo, "add", "--", *files)
    _git(repo, "commit", "-q", "-m", f"Release dataset {label} ({summary['samples']} samples, {content})", "--", *files)
    tag = tag_name(name, version)
    _git(repo, "tag", "-a", tag, "-m", f"defectforge dataset {label}")
    pushed: list[str] = []
    if push:
        pushed.append(_dvc_push(repo, dvc_remote, f"releases/{name}/v{version}.dvc"))
        g = _git_push(repo, tag, branch)
        if g:
            pushed.append(g)
    return Published(name, version, tag, True, summary, tuple(pushed), tuple(notes))

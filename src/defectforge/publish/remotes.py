"""Which DVC remote a published version can be read from.

A consumer of ``dataset/<name>/v<N>`` (``dvc get``, ``dvc import``, ``defectforge.load``)
sees the repository as it is at that tag: only the committed ``.dvc/config`` counts, not
the factory's working copy, ``.dvc/config.local`` or the global config. These helpers read
the default remote of one config text (the working file, or ``git show REV:.dvc/config``).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

CONFIG = ".dvc/config"
LOCAL_CONFIG = ".dvc/config.local"


@dataclass(frozen=True)
class DefaultRemote:
    name: str
    url: str  # "" when the section is missing

    @property
    def portable(self) -> bool:
        """A URL another machine or folder resolves the same way: a scheme (s3://, ssh://, file://)
        or an absolute path. A relative path is relative to the reader's own ``.dvc`` folder."""
        return bool(self.url) and (bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", self.url)) or os.path.isabs(self.url))


def parse_default(text: str | None) -> DefaultRemote | None:
    """The default remote (``core.remote`` and its URL) of a DVC config text, or None."""
    if not text:
        return None
    from configobj import ConfigObj, ConfigObjError

    try:
        conf = ConfigObj(text.splitlines(), interpolation=False)
    except ConfigObjError:
        return None
    name = str((conf.get("core") or {}).get("remote") or "").strip()
    if not name:
        return None
    section = conf.get(f'remote "{name}"') or {}
    return DefaultRemote(name, str(section.get("url") or "").strip())


def committed_default(repo: str | os.PathLike, rev: str = "HEAD") -> DefaultRemote | None:
    """The default remote of ``.dvc/config`` as committed at ``rev`` (None: no such file or no default)."""
    r = subprocess.run(["git", "show", f"{rev}:{CONFIG}"], cwd=repo, capture_output=True, text=True)
    return parse_default(r.stdout) if r.returncode == 0 else None


def working_default(repo: str | os.PathLike, local: bool = False) -> DefaultRemote | None:
    """The default remote of the working ``.dvc/config`` (``local``: of ``.dvc/config.local``)."""
    f = Path(repo) / (LOCAL_CONFIG if local else CONFIG)
    return parse_default(f.read_text()) if f.is_file() else None

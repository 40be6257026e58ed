"""The README, docs/ and the experiments' READMEs point at files that exist: a moved study, script
or page breaks this test, not a reader's link. Markdown links are checked relative to their page,
backticked repository paths (``docs/...``, ``bench/...``) relative to the repository root."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "experiments" / "README.md",
         *sorted((ROOT / "experiments").glob("*/README.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
PATH = re.compile(r"`((?:docs|experiments|bench|tests|src|flows|stages)/[A-Za-z0-9_./-]+\.(?:md|py|json|png|sh|txt))`")


def broken(page: Path) -> list[str]:
    text = page.read_text()
    out = [t for t in LINK.findall(text) if not t.startswith(("http://", "https://")) and not (page.parent / t).exists()]
    return out + [t for t in PATH.findall(text) if not (ROOT / t).exists()]


def test_pages_exist():
    assert (ROOT / "docs" / "results.md").is_file() and len(PAGES) > 10


def test_every_link_resolves():
    bad = {str(p.relative_to(ROOT)): b for p in PAGES if (b := broken(p))}
    assert not bad, bad


def test_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150

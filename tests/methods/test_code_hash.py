"""The code part of a sample's id is per method (:func:`defectforge.methods.code_sha256`):
the generate stage's module and the method's own module or package, with what they import.
An edit to one method's files changes that method's hash only, so the generate stage
(whose output persists between runs) remakes only that method's samples."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest

from defectforge.code import SRC
from defectforge.methods import code_files, code_sha256, get_method_class, registered_methods

STAGE = "defectforge.pipeline.generate"


@pytest.fixture()
def src(tmp_path):
    """A copy of the library's source to edit."""
    shutil.copytree(SRC / "defectforge", tmp_path / "defectforge", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def _hashes(src):
    return {name: code_sha256(name, stage=STAGE, src=src) for name in registered_methods()}


def _edit(src, rel):
    path = src / "defectforge" / rel
    path.write_text(path.read_text() + "\n# an edit\n")


def test_the_hash_depends_on_the_files_not_on_where_they_are(src, tmp_path_factory):
    other = tmp_path_factory.mktemp("again")
    shutil.copytree(src / "defectforge", other / "defectforge")
    first = _hashes(src)
    assert _hashes(other) == first and len(set(first.values())) == len(first)  # one hash per method


@pytest.mark.parametrize("rel,changed", [
    ("methods/defectdiffu/sampler.py", {"defectdiffu"}),
    ("methods/anomalydiffusion/sampler.py", {"anomalydiffusion"}),
    ("methods/copy_paste.py", {"copy-paste"}),
    ("methods/inversion.py", {"inversion"}),
    # training code makes checkpoints (hashed with the checkpoints), not samples
    ("diffusion/training.py", set()),
    ("methods/defectdiffu/training.py", set()),
    # the stage itself, and what every method builds on
    ("pipeline/generate.py", set(registered_methods())),
    ("methods/base.py", set(registered_methods())),
    ("methods/config.py", set(registered_methods())),
])
def test_an_edit_changes_only_its_methods_code_hash(src, rel, changed):
    before = _hashes(src)
    _edit(src, rel)
    after = _hashes(src)
    assert {name for name in before if before[name] != after[name]} == changed


@pytest.mark.parametrize("name", registered_methods())
def test_an_edit_to_a_methods_config_class_changes_that_methods_hash_only(src, name):
    """Each method declares its config model beside its code: editing the class (wherever the
    method keeps it) remakes that method's samples, not the others' (a config kept in a module
    shared by several methods fails this)."""
    cls = get_method_class(name).config_class
    rel = Path(inspect.getsourcefile(cls)).resolve().relative_to(SRC)
    lines, start = inspect.getsourcelines(cls)
    path = src / rel
    text = path.read_text().splitlines(keepends=True)
    assert text[start - 1] == lines[0] and lines[0].startswith(f"class {cls.__name__}(")
    before = _hashes(src)
    path.write_text("".join(text[:start] + ["    # an edit to the config class\n"] + text[start:]))
    after = _hashes(src)
    assert {m for m in before if before[m] != after[m]} == {name}


def test_the_registry_is_not_part_of_a_method_and_adding_one_changes_no_hash(src):
    before = _hashes(src)
    _edit(src, "methods/__init__.py")
    assert _hashes(src) == before
    files = {f.relative_to(SRC).as_posix() for f in code_files(["defectforge.methods.copy_paste", STAGE])}
    assert "defectforge/methods/copy_paste.py" in files and "defectforge/pipeline/generate.py" in files
    assert not any(f.startswith(("defectforge/methods/defectdiffu/", "defectforge/methods/inversion")) for f in files)


def test_the_stage_uses_the_per_method_hash_in_sample_ids(monkeypatch):
    import defectforge.pipeline.generate as generate_stage

    assert generate_stage.package_sha256("copy-paste") == code_sha256("copy-paste", stage=STAGE)
    assert generate_stage.package_sha256("copy-paste") != generate_stage.package_sha256("defectdiffu")

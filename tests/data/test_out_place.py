"""The stages' own output-folder check (``check_out_place``, through ``claim_dir`` / ``atomic_dir``
and generate's root claim): called from Python, not only from the command line, a run never
takes the current folder, ``/`` or a project's root as its output, and deletes nothing there."""

from __future__ import annotations

import os

import pytest

from defectforge.data.files import atomic_dir, check_out_place, claim_dir
from defectforge.errors import DataError
from defectforge.params.generate import GenerateParams
from defectforge.pipeline.generate import run as run_generate


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    return here


@pytest.mark.parametrize("out", [".", "./", "..", "/", "sub/.."])
def test_claim_and_atomic_dir_refuse_the_current_folder_and_above(cwd, out):
    with pytest.raises(DataError, match="current folder|file system's root"):
        claim_dir(out)
    with pytest.raises(DataError, match="current folder|file system's root"):
        with atomic_dir(out):
            pass
    assert os.listdir(cwd) == [] and os.listdir(cwd.parent) == ["here"]  # no .tmp folder beside it


@pytest.mark.parametrize("marker", [".git", ".dvc", "dvc.yaml"])
def test_a_project_root_is_refused_even_when_empty_otherwise(tmp_path, cwd, marker):
    project = tmp_path / "project"
    project.mkdir()
    (project / marker).mkdir() if marker != "dvc.yaml" else (project / marker).write_text("stages: {}\n")
    with pytest.raises(DataError, match=f"project's root \\(it holds {marker}\\)"):
        check_out_place(project)
    with pytest.raises(DataError, match="project's root"):
        claim_dir(project)


def test_a_folder_holding_an_input_is_refused(tmp_path, cwd):
    data = tmp_path / "data"
    (data / "sample").mkdir(parents=True)
    with pytest.raises(DataError, match="holds the input"):
        check_out_place(data, inputs=[data / "sample"])
    check_out_place(data / "out", inputs=[data / "sample"])  # beside the input: fine


def test_generate_into_an_empty_current_folder_is_refused_and_it_survives(sample_manifests, cwd):
    """An empty current folder used to pass the ownership check; a failed run would then remove it whole."""
    with pytest.raises(DataError, match="is the current folder"):
        run_generate(GenerateParams(n_per_defect=1, shard_size=2, seed=0), sample_manifests[1], ".", progress=False)
    assert os.path.isdir(cwd) and os.listdir(cwd) == [] and os.getcwd() == str(cwd)

"""dvc.yaml's code deps cannot go stale: every defectforge module a stage runs is a dep.

For each stage, start from its entry point (the script in its ``cmd``), follow every
``import`` / ``from ... import`` anywhere in the module (lazy imports inside functions
run too) and every string naming a ``defectforge.*`` module (the method registry loads
its modules by name), transitively; every file found must lie under one of the
stage's ``deps``. Editing any of them then reruns the stage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from defectforge import code

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def closure(entry: Path) -> set[Path]:
    """The files of every defectforge module reachable from ``entry`` (the library's own walk,
    :func:`defectforge.code.closure`, on this checkout's src/)."""
    return code.closure(entry, SRC)


def _stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _covered(f: Path, deps: list[str]) -> bool:
    rel = f.relative_to(ROOT).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_module_a_stage_imports_is_one_of_its_deps(stage):
    spec = _stages()[stage]
    script = ROOT / spec["cmd"].split()[1]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    assert _covered(script, deps), f"{stage}: its own script {script.name} is not a dep"
    missing = sorted(f.relative_to(ROOT).as_posix() for f in closure(script) if not _covered(f, deps))
    assert not missing, f"dvc.yaml stage {stage!r} runs these modules but does not list them as deps: {missing}"


def test_the_check_sees_lazy_and_registry_imports():
    """The closure must follow imports inside functions and the registry's module names."""
    files = {f.relative_to(SRC).as_posix() for f in closure(ROOT / "stages" / "generate.py")}
    assert "defectforge/methods/inversion.py" in files  # by name, from the registry
    assert "defectforge/pipeline/fanout.py" in files     # lazy, inside generate.run
    assert "defectforge/metrics/detection.py" in closure_names("detector")


def closure_names(stage: str) -> set[str]:
    script = ROOT / _stages()[stage]["cmd"].split()[1]
    return {f.relative_to(SRC).as_posix() for f in closure(script)}


def test_no_stage_module_uses_the_consumer_accessors():
    for f in {f for st in _stages() for f in closure(ROOT / _stages()[st]["cmd"].split()[1])} - {SRC / "defectforge" / "__init__.py"}:
        text = f.read_text()
        assert "defectforge.load(" not in text and "defectforge.ManifestDataset" not in text, f


def test_generate_code_hash_follows_its_deps_only(tmp_path):
    """generate's sample ids hash the code of the modules it can import: an edit there changes
    the hash (DVC reruns the stage too), an edit elsewhere (the dataset card) does not, so a
    from-scratch `dvc repro` still matches the committed lock."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(SRC / "defectforge", src / "defectforge", ignore=shutil.ignore_patterns("__pycache__"))
    h = code.code_sha256.__wrapped__  # uncached: the files change below
    before = h("defectforge.pipeline.generate", src)
    with open(src / "defectforge/publish/card.py", "a") as f:
        f.write("# an edit outside generate's modules\n")
    assert h("defectforge.pipeline.generate", src) == before
    with open(src / "defectforge/methods/copy_paste.py", "a") as f:
        f.write("# an edit of a method generate loads by name\n")
    assert h("defectforge.pipeline.generate", src) != before
    # and every file it hashes is one of the generate stage's deps
    assert closure_names("generate") >= {f.relative_to(src).as_posix() for f in code.closure(code.module_file("defectforge.pipeline.generate", src), src)}


# ------------------------------------------------------------------ what an edit reruns
def _entries(items) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in items or []]


def _overlap(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def reruns(*, file: str | None = None, key: str | None = None) -> set[str]:
    """The stages ``dvc repro`` reruns after an edit of ``file`` (a path in the repository) or of
    params key ``key``: each stage whose deps cover the file or whose ``params:`` cover the key,
    then every stage whose deps take an output of a rerun stage, transitively."""
    stages = _stages()
    todo = {name for name, spec in stages.items()
            if (file and any(_overlap(file, d) for d in _entries(spec["deps"])))
            or (key and any(key == p or key.startswith(p + ".") for p in _entries(spec.get("params"))))}
    done: set[str] = set()
    while todo:
        name = todo.pop()
        done.add(name)
        outs = [o for field in ("outs", "metrics", "plots") for o in _entries(stages[name].get(field))]
        todo |= {other for other, spec in stages.items() if other not in done
                 and any(_overlap(o, d) for o in outs for d in _entries(spec["deps"]))}
    return done


def _files(folder: str) -> list[str]:
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_an_edit_to_the_detector_reruns_detector_and_release_only():
    files = _files("src/defectforge/detector") + ["src/defectforge/pipeline/detector.py", "src/defectforge/params/detector.py",
                                                  "stages/detector.py"]
    for f in files:
        assert reruns(file=f) == {"detector", "release"}, f
    for key in ("detector.epochs", "detector.seeds", "detector"):
        assert reruns(key=key) == {"detector", "release"}, key


def test_an_edit_to_a_method_reruns_neither_split_nor_pretrain():
    """A method's file is no dep of the stages before generate's models (sample, ingest, split,
    pretrain: it reads which methods need checkpoints from defectforge.params.needs, not the
    registry); a method's own params section (``generate.<method>``) is no param of pretrain or
    finetune either."""
    for f in _files("src/defectforge/methods"):
        assert not reruns(file=f) & {"sample", "ingest", "split", "pretrain"}, f
        assert "generate" in reruns(file=f), f
    for key in ("generate.copy_paste.feather", "generate.inversion.steps", "generate.n_per_defect"):
        assert reruns(key=key) == {"generate", "refine", "quality", "detector", "release"}, key
    assert {"pretrain", "finetune"} <= reruns(key="generate.methods")  # which methods need models is theirs to read


def test_the_rerun_check_follows_outputs_downstream():
    assert reruns(key="split.seed") == {"split", "pretrain", "finetune", "generate", "refine", "quality", "detector", "release"}
    assert reruns(file="src/defectforge/params/refine.py") == {"refine", "quality", "detector", "release"}

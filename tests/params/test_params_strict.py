"""Params are strictly typed and the params file is read defensively (issue 10).

"3" is not an integer, ``true`` is not a count, "off" is not a boolean, a method is
listed once; the file must be UTF-8, without duplicate keys or aliases; every error is
one short line naming the file and the key. Valid files, and ``dvc exp run -S`` overrides
(written into params.yaml typed by YAML), still load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from defectforge.errors import ParamsError
from defectforge.params.file import load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "data, key",
    [
        ({"generate": {"n_per_defect": "3"}}, "generate.n_per_defect"),
        ({"generate": {"n_per_defect": True}}, "generate.n_per_defect"),
        ({"generate": {"inversion": {"steps": True}}}, "generate.inversion.steps"),
        ({"detector": {"seeds": [0, "1"]}}, "detector.seeds.1"),
        ({"generate": {"copy_paste": {"flip": "off"}}}, "generate.copy_paste.flip"),
        ({"generate": {"inversion": {"crop": "yes"}}}, "generate.inversion.crop"),
        ({"generate": {"inversion": {"crop": 1}}}, "generate.inversion.crop"),
        ({"pretrain": {"lr": "0.01"}}, "pretrain.lr"),
        ({"data": {"root": 5}}, "data.root"),
        ({"data": {"on_bad": "ignore"}}, "data.on_bad"),
        ({"generate": {"methods": ["copy-paste", "inversion", "copy-paste"]}}, "generate.methods"),
        ({"data": {"image_glob": "/etc/*"}}, "data.image_glob"),
        ({"data": {"image_glob": "../*"}}, "data.image_glob"),
        ({"data": {"image_glob": "images/../../*"}}, "data.image_glob"),
    ],
)
def test_wrong_types_are_refused_not_coerced(data, key):
    with pytest.raises(ParamsError) as e:
        parse_params(data, "params.yaml")
    text = str(e.value)
    assert text.startswith(f"params.yaml: {key}"), text
    assert "\n" not in text and len(text) < 300


def test_duplicate_method_message_names_it():
    with pytest.raises(ParamsError, match="'copy-paste' is repeated"):
        parse_params({"generate": {"methods": ["copy-paste", "copy-paste"]}})


def test_valid_loose_forms_still_load():
    p = parse_params(
        {
            "pretrain": {"lr": 1, "steps": 20},  # an integer where a float is expected
            "generate": {"copy_paste": {"scale_range": [1, 2], "flip": False}, "inversion": {"guidance": 3}},
            "data": {"image_glob": "images/*.png"},
        }
    )
    assert p.pretrain.lr == 1.0 and isinstance(p.pretrain.lr, float)
    assert p.generate.copy_paste.scale_range == (1.0, 2.0)
    assert p.generate.inversion.guidance == 3.0
    assert p.data.on_bad == "fail"
    # a method config dumped to JSON (lists) is read back (samples store their config)
    from defectforge.methods.copy_paste import CopyPasteConfig

    cfg = p.generate.copy_paste
    assert CopyPasteConfig(**cfg.to_dict()) == cfg


def test_repo_params_yaml_and_dvc_set_param_overrides(tmp_path):
    """``dvc exp run -S`` goes through dvc.utils.hydra.apply_overrides into params.yaml."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    base = load_params(params)
    apply_overrides(
        params,
        [
            "generate.n_per_defect=16",
            "generate.inversion.steps=20",
            "generate.copy_paste.feather=2",  # int into a float
            "generate.copy_paste.flip=false",
            "pretrain.lr=0.01",
            "data.on_bad=skip",
            "detector.seeds=[3,4]",
            "generate.methods=[copy-paste,inversion]",
        ],
    )
    p = load_params(params)
    assert p.generate.n_per_defect == 16 and p.generate.inversion.steps == 20
    assert p.generate.copy_paste.feather == 2.0 and p.generate.copy_paste.flip is False
    assert p.pretrain.lr == 0.01 and p.data.on_bad == "skip" and p.detector.seeds == [3, 4]
    assert p.generate.methods == ["copy-paste", "inversion"]
    assert p.split == base.split
    # a string where an integer belongs is refused, also when it arrives through -S
    apply_overrides(params, ["generate.n_per_defect='16'"])
    with pytest.raises(ParamsError, match=r"params.yaml: generate.n_per_defect"):
        load_params(params)


def test_non_utf8_params_file_names_the_file(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("data:\n  root: donn\xe9es\n".encode("latin-1"))
    with pytest.raises(ParamsError) as e:
        load_params(bad)
    text = str(e.value)
    assert text.startswith(f"{bad}: not UTF-8") and "\n" not in text


def test_duplicate_yaml_key_is_refused(tmp_path):
    f = tmp_path / "dup.yaml"
    f.write_text("generate:\n  n_per_defect: 4\n  seed: 1\n  n_per_defect: 8\n")
    with pytest.raises(ParamsError) as e:
        load_params(f)
    text = str(e.value)
    assert text.startswith(f"{f}: ") and "duplicate key 'n_per_defect'" in text and "line 2" in text
    f.write_text("split:\n  seed: 0\nsplit:\n  seed: 1\n")
    with pytest.raises(ParamsError, match="duplicate key 'split'"):
        load_params(f)


def test_yaml_alias_bomb_is_one_short_line(tmp_path):
    rows = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        rows.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(rows) + "\ngenerate:\n  methods: *i\n")
    with pytest.raises(ParamsError) as e:
        load_params(bomb)
    text = str(e.value)
    assert text.startswith(f"{bomb}: ") and "alias" in text
    assert len(text) < 500 and "\n" not in text


def test_alias_inside_a_section_is_refused_too(tmp_path):
    f = tmp_path / "alias.yaml"
    f.write_text("pretrain:\n  seed: &s 3\nfinetune:\n  seed: *s\n")
    with pytest.raises(ParamsError, match=r"line 4.*alias \*s is not allowed"):
        load_params(f)


def test_huge_wrong_value_is_cut_short():
    with pytest.raises(ParamsError) as e:
        parse_params({"generate": {"n_per_defect": "x" * 100_000, "seed": ["y" * 1000] * 1000}})
    assert len(str(e.value)) <= 500


def test_cli_bad_params_file_one_line_exit_2(tmp_path):
    import contextlib
    import io

    from defectforge.cli import main

    f = tmp_path / "p.yaml"
    f.write_bytes(b"split:\n  seed: \xff\xfe\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["split", "--source", str(tmp_path / "a.parquet"), "--out", str(tmp_path / "b.parquet"), "--params", str(f)])
    assert e.value.code == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {f}: not UTF-8")

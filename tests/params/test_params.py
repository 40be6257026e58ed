import pytest

from defectforge.errors import ParamsError
from defectforge.params.file import Params, load_params, parse_params


def test_repo_params_file_is_valid():
    p = load_params("params.yaml")
    assert isinstance(p, Params)
    from defectforge.methods import registered_methods

    assert set(p.generate.methods) <= set(registered_methods())
    # every method the registry knows has its section in params.yaml (its documented defaults)
    import yaml

    raw = yaml.safe_load(open("params.yaml"))["generate"]
    assert all(m.replace("-", "_") in raw for m in registered_methods())


@pytest.mark.parametrize(
    "data, message",
    [
        ({"split": {"schem": "third"}}, "split.schem: unknown key"),
        ({"nope": {}}, "nope: unknown key"),
        ({"split": {"scheme": "thirds"}}, "split.scheme: got 'thirds'; allowed: 'third' or 'kfold'"),
        ({"generate": {"n_per_defect": "many"}}, "generate.n_per_defect"),
        ({"generate": {"n_per_defect": 0}}, "generate.n_per_defect: 0 is out of range"),
        ({"split": {"good_test_fraction": 1.5}}, "split.good_test_fraction"),
        ({"split": {"scheme": "kfold", "k": 2, "fold": 2}}, "split.fold: 2 must be < split.k"),
        ({"generate": {"copy_paste": {"scale_range": [2, 1]}}}, "generate.copy_paste.scale_range"),
        ({"data": {"layout": "coco"}}, "data.layout"),
        ({"release": {"name": "Bad Name"}}, "release.name"),
    ],
)
def test_bad_params_give_one_line_naming_the_key(data, message):
    with pytest.raises(ParamsError) as e:
        parse_params(data, "params.yaml")
    text = str(e.value)
    assert message in text and "\n" not in text and text.startswith("params.yaml: ")


def test_params_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("split: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(bad)


def test_section_hash_changes_with_values():
    a = parse_params({}).generate
    b = parse_params({"generate": {"seed": 1}}).generate
    assert a.sha256() != b.sha256() and a.sha256() == parse_params({}).generate.sha256()


def test_the_stages_before_generate_read_what_the_method_classes_declare():
    """pretrain and finetune read which methods need checkpoints from defectforge.params.needs
    (so a method edit does not rerun them); it must say what the registered classes say
    (``python -m defectforge.params.write_needs`` rewrites it)."""
    from defectforge.params.needs import NEEDS_CHECKPOINTS, ModelNeeds
    from defectforge.params.write_needs import declared

    assert NEEDS_CHECKPOINTS == declared()
    for generate in ({}, {"methods": ["copy-paste"]}, {"methods": ["copy-paste", "inversion"], "inversion": {"steps": 3}},
                     {"methods": ["perlin"], "target_placement_by_type": {"crack": "generated"}},
                     {"methods": ["blended", "anomalydiffusion"], "target_placement": "generated"}):
        full = parse_params({"generate": generate}).generate
        light = ModelNeeds.model_validate(generate)
        assert light.model_needs() == full.model_needs(), generate


def test_the_light_generate_view_refuses_what_the_full_one_refuses():
    from defectforge.params.loader import parse_section
    from defectforge.params.needs import ModelNeeds

    for bad, message in (({"methods": ["nope"]}, "generate.methods.0: got 'nope'; allowed: 'copy-paste', 'cutpaste', 'perlin'"),
                         ({"target_placement": "left"}, "generate.target_placement: got 'left'")):
        with pytest.raises(ParamsError) as full:
            parse_params({"generate": bad})
        with pytest.raises(ParamsError) as light:
            parse_section(bad, "generate", ModelNeeds)
        assert message in str(full.value) and str(light.value) == str(full.value)

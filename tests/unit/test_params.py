from pathlib import Path

import pytest
import yaml

from otcurate_pipeline.params import ParamsError, load, load_all

ROOT = Path(__file__).resolve().parents[2]


def shipped():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_shipped_params_are_valid_and_complete():
    typed = load_all(shipped())
    assert typed["detect"].method == "clip_score"
    import dataclasses

    # every key of every section is written out in params.yaml (DVC tracks what is written)
    for name, obj in typed.items():
        keys = {f.name for f in dataclasses.fields(obj)}
        assert keys == set(shipped()[name]), name


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"finetune": {"lr": "fast"}}, "finetune.lr: expected a number, got 'fast' (str)"),
        ({"finetune": {"steps": 1.5}}, "finetune.steps: expected an integer"),
        ({"finetune": {"steps": True}}, "finetune.steps: expected an integer"),
        (
            {"ingest": {"noise": {"rat": 0.1}}},
            "ingest.noise.rat: unknown key. Did you mean 'rate'?",
        ),
        (
            {"ingest": {"source": "web"}},
            "ingest.source: expected one of 'shapes' or 'glyphs' or 'digits' or 'hf'",
        ),
        ({"ingest": {"noise": {"rate": 1.5}}}, "ingest.noise.rate must be in [0, 1)"),
        ({"ingest": {"val_fraction": 0.6, "test_fraction": 0.5}}, "so that a train split remains"),
        (
            {"coreset": {"fraction": 0.1, "size": 10}},
            "set exactly one of coreset.fraction and coreset.size",
        ),
        (
            {"coreset": {"fraction": None, "size": None}},
            "set exactly one of coreset.fraction and coreset.size",
        ),
        (
            {"finetune": {"method": "magic"}},
            "finetune.method: unknown method 'magic'. Known: clip, filter, gradient_ascent, ncu",
        ),
        ({"evaluate": {"recall_at": [0]}}, "evaluate.recall_at must be"),
        ({"pretrain": {"pretrained": None, "steps": 0}}, "nothing would be trained"),
        ({"ingest": {"source": "hf"}}, "ingest.hf.path is empty"),
    ],
)
def test_bad_values_name_the_key_and_fix(patch, message):
    params = shipped()
    for section, values in patch.items():
        for k, v in values.items():
            if isinstance(v, dict):
                params[section][k].update(v)
            else:
                params[section][k] = v
    with pytest.raises(ParamsError) as exc:
        load_all(params)
    assert message in str(exc.value)


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match="unknown section 'finetun'. Did you mean 'finetune'"):
        load({**shipped(), "finetun": {}}, "base")


def test_missing_keys_take_defaults_and_ints_widen_to_float():
    p = load({"finetune": {"lr": 1}}, "finetune")
    assert p.lr == 1.0 and isinstance(p.lr, float)
    assert p.steps == 200


def test_exponent_floats_read_as_numbers_like_dvc():
    from otcurate_pipeline.params import parse_yaml

    p = load(parse_yaml("finetune:\n  lr: 5e-05\n"), "finetune")
    assert p.lr == 5e-05


def test_detect_raise_fraction_is_the_default_and_leaves_auto_alone():
    assert load({}, "detect").raise_fraction  # bench/results/flagrule.md
    assert load({"detect": {"fraction": None, "auto": True}}, "detect").auto


def test_detect_auto_excludes_fraction_and_threshold():
    assert load({"detect": {"auto": True, "fraction": None}}, "detect").auto
    with pytest.raises(ParamsError, match="or detect.auto: true"):
        load({"detect": {"auto": True, "fraction": 0.2}}, "detect")


METHOD_SECTIONS = {  # section -> the library registry its per-method subsections come from
    "detect": "otcurate.detect:METHODS",
    "coreset": "otcurate.coreset:METHODS",
    "distill": "otcurate.distill:METHODS",
    "finetune": "otcurate.finetuning:FINETUNE_METHODS",
}


def _registry(spec):
    import importlib

    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


@pytest.mark.parametrize("section", list(METHOD_SECTIONS))
def test_each_method_option_is_written_once_in_the_library(section):
    """The subsections are the library's options records: same keys, same defaults, and the
    values params.yaml ships are those defaults (no second copy that could drift)."""
    import dataclasses

    registry = _registry(METHOD_SECTIONS[section])
    defaults = load({}, section)
    with_options = {n: m for n, m in registry.items() if dataclasses.fields(m.options)}
    assert with_options, section
    for name, method in with_options.items():
        assert getattr(defaults, name) == method.options()
        assert shipped()[section][name] == dataclasses.asdict(method.options()), name
    assert set(shipped()[section]) >= set(with_options)


def test_a_flat_method_option_points_at_its_subsection():
    with pytest.raises(
        ParamsError, match=r"detect.reg: unknown key. .*detect.ot.reg, detect.infoot.reg"
    ):
        load({"detect": {"reg": 0.1}}, "detect")
    with pytest.raises(ParamsError, match="finetune.gradient_ascent.ascent_weight"):
        load({"finetune": {"ascent_weight": 0.2}}, "finetune")
    with pytest.raises(ParamsError, match="Did you mean 'lam'"):
        load({"detect": {"infoot": {"lamda": 1}}}, "detect")


def test_the_library_checks_its_own_option_values_and_the_key_is_named():
    with pytest.raises(ParamsError, match=r"finetune.ncu: gamma must be in \[0, 1\]; got 2.0"):
        load({"finetune": {"ncu": {"gamma": 2}}}, "finetune")
    with pytest.raises(ParamsError, match="coreset.goracs: cut_num must be > 0"):
        load({"coreset": {"goracs": {"cut_num": 0}}}, "coreset")
    with pytest.raises(
        ParamsError, match="finetune.ncu.nc_source: expected one of 'detect' or 'batch'"
    ):
        load({"finetune": {"ncu": {"nc_source": "magic"}}}, "finetune")
    p = load({"detect": {"method": "ot", "ot": {"reg": 0.05}}}, "detect")
    assert p.method_options().reg == 0.05 and p.infoot.reg == 0.02  # only the chosen one is used
    assert (
        load({"detect": {"method": "clip_score"}}, "detect").method_options()
        == type(load({}, "detect").method_options())()
    )

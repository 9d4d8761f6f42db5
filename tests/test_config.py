import re
from pathlib import Path

import pytest
import yaml

from lmpipe.config import (
    SECTIONS,
    ParamsError,
    RLParams,
    load_params,
    load_yaml,
    read_yaml,
    render_params_yaml,
    subsection,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, doc) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return p


def test_repo_params_load_and_document_every_key():
    params = load_params(ROOT / "params.yaml", list(SECTIONS))
    assert params.seed >= 0
    text = (ROOT / "params.yaml").read_text()
    for name, model in SECTIONS.items():
        for key, info in model.model_fields.items():
            # each key appears in its section with the description as a comment
            assert re.search(rf"^  {key}: .*# {re.escape(info.description)}$", text, re.M), (
                f"params.yaml lacks {name}.{key} with its description"
            )
            sub = subsection(model, key)
            for k, i in (sub.model_fields if sub else {}).items():  # rl.ppo.clip
                assert re.search(rf"^    {k}: .*# {re.escape(i.description)}$", text, re.M), (
                    f"params.yaml lacks {name}.{key}.{k} with its description"
                )


def test_render_roundtrips_to_defaults(tmp_path):
    p = write(tmp_path, render_params_yaml())
    params = load_params(p, list(SECTIONS))
    for name, model in SECTIONS.items():
        assert getattr(params, name) == model()


def test_bad_value_names_full_key_value_and_allowed(tmp_path):
    p = write(tmp_path, {"seed": 1, "data": {"val_fraction": 1.5}})
    with pytest.raises(ParamsError) as e:
        load_params(p, ["data"])
    msg = str(e.value)
    assert "data.val_fraction = 1.5" in msg
    assert "< 1" in msg


def test_bad_literal_lists_choices(tmp_path):
    p = write(tmp_path, {"data": {"source": "web"}})
    with pytest.raises(ParamsError) as e:
        load_params(p, ["data"])
    msg = str(e.value)
    assert "data.source = 'web'" in msg
    for choice in ("'builtin'", "'text'", "'jsonl'", "'hf'"):
        assert choice in msg


def test_unknown_key_suggests_near_valid_keys(tmp_path):
    p = write(tmp_path, {"data": {"val_fracton": 0.1}})
    with pytest.raises(ParamsError) as e:
        load_params(p, ["data"])
    msg = str(e.value)
    assert "data.val_fracton: unknown key" in msg
    assert "did you mean val_fraction" in msg


def test_unknown_section_and_wrong_type(tmp_path):
    with pytest.raises(ParamsError, match="unknown params section 'tokeniser'.*tokenizer"):
        load_params(write(tmp_path, {"tokeniser": {}}), ["data"])
    with pytest.raises(ParamsError, match=r"tokenizer.vocab_size = 'big'"):
        load_params(write(tmp_path, {"tokenizer": {"vocab_size": "big"}}), ["tokenizer"])
    with pytest.raises(ParamsError, match="seed = -3"):
        load_params(write(tmp_path, {"seed": -3}), ["data"])


def test_cross_field_rules(tmp_path):
    with pytest.raises(ParamsError, match="leaves less than 10% for train"):
        load_params(write(tmp_path, {"data": {"val_fraction": 0.5, "test_fraction": 0.45}}), [])
    with pytest.raises(ParamsError, match="set data.path"):
        load_params(write(tmp_path, {"data": {"source": "text"}}), [])


def test_errors_in_unrequested_sections_still_fail(tmp_path):
    p = write(tmp_path, {"tokenizer": {"vocab_size": 10}})
    with pytest.raises(ParamsError, match="tokenizer.vocab_size = 10"):
        load_params(p, ["data"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml", [])
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(write(tmp_path, "data: [unclosed"), [])


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    """`lr: 5e-5` is a float, as YAML 1.2 and DVC read it; PyYAML's YAML 1.1 would hand it over
    as the string '5e-5'. Integers, dates and words keep their types."""
    doc = read_yaml(write(tmp_path, "rl:\n  lr: 5e-5\n  kl_coef: 2E-1\n  steps: 80\n"))
    assert doc["rl"] == {"lr": 5e-5, "kl_coef": 0.2, "steps": 80}
    assert type(doc["rl"]["lr"]) is float and type(doc["rl"]["steps"]) is int
    assert load_params(tmp_path / "params.yaml", ["rl"]).rl.lr == 5e-5
    for text, value in [("-1e+3", -1000.0), ("1.0e-5", 1e-5), ("1_000", 1000), ("1e", "1e")]:
        assert load_yaml(text) == value and type(load_yaml(text)) is type(value), text
    assert load_yaml("e5") == "e5" and load_yaml("5e-5x") == "5e-5x"


def test_flat_params_for_mlflow(tmp_path):
    params = load_params(write(tmp_path, {"seed": 7}), ["tokenizer"])
    flat = params.flat()
    assert flat["seed"] == 7
    assert flat["tokenizer.vocab_size"] == 4096
    assert not any(k.startswith("data.") for k in flat)
    with pytest.raises(AttributeError, match="not loaded"):
        _ = params.data


def test_reward_and_rl_sections_validate_their_combinations(tmp_path):
    cases = [
        (
            {"rl": {"algo": "rloo", "samples_per_prompt": 1}},
            "rl.algo 'rloo' needs rl.samples_per_prompt >= 2",
        ),
        ({"preference": {"source": "file"}}, "set preference.path"),
        ({"preference": {"tau": -1}}, "preference.tau = -1"),
        ({"rl": {"algo": "a2c"}}, "one of 'ppo', 'rloo', 'dpg'"),
    ]
    for params, message in cases:
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        with pytest.raises(ParamsError, match=re.escape(message)):
            load_params(path, ["rl", "preference"])
    path.write_text(yaml.safe_dump({"rl": {"missing_eos_penalty": None}}))
    assert load_params(path, ["rl"]).rl.missing_eos_penalty is None


def test_algorithm_settings_are_nested_and_old_flat_keys_name_their_new_place(tmp_path):
    p = write(tmp_path, {"rl": {"ppo": {"clip": 0.3, "epochs": 4}, "dpg": {"swap_every": 2}}})
    rl = load_params(p, ["rl"]).rl
    assert (rl.ppo.clip, rl.ppo.epochs, rl.dpg.swap_every) == (0.3, 4, 2)
    assert load_params(p, ["rl"]).flat()["rl.ppo.clip"] == 0.3
    cases = [
        ({"clip": 0.3}, "rl.clip: moved to rl.ppo.clip"),
        ({"ppo_epochs": 4}, "rl.ppo_epochs: moved to rl.ppo.epochs"),
        ({"dpg_swap_every": 2}, "rl.dpg_swap_every: moved to rl.dpg.swap_every"),
        ({"ppo": {"clipp": 0.3}}, "rl.ppo.clipp: unknown key. did you mean clip"),
        ({"ppo": {"clip": -1}}, "rl.ppo.clip = -1"),
        ({"ppo": {"value_init": "x"}}, "one of 'reward', 'zero'"),
    ]
    for raw, message in cases:
        with pytest.raises(ParamsError, match=re.escape(message)):
            load_params(write(tmp_path, {"rl": raw}), ["rl"])
    for old, new in RLParams.moved.items():  # every moved key's new place exists
        section, key = new.split(".")
        assert key in subsection(RLParams, section).model_fields, (old, new)
        assert old not in RLParams.model_fields

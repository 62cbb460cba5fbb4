"""Tests of the pydantic configs: validation, JSON round trips, dispatch."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ftpeft import (
    FullTune,
    FullTuneConfig,
    LoRA,
    LoRAConfig,
    LoRAParameters,
    PeftStack,
    PeftStackConfig,
    config_from_json,
    peft_method_from_config,
)

names = st.from_regex(r"[a-z_]{1,8}(\.[a-z0-9_]{1,8}){0,3}", fullmatch=True)
patterns = st.one_of(names, st.lists(names, min_size=1, max_size=4))
lora_params = st.builds(
    LoRAParameters,
    r=st.integers(1, 512),
    alpha=st.floats(min_value=1e-3, max_value=1e4, allow_nan=False, allow_infinity=False),
    dropout=st.floats(min_value=0.0, max_value=0.99),
    use_rslora=st.booleans(),
    use_dora=st.booleans(),
    lora_bias=st.booleans(),
    fan_in_fan_out=st.booleans(),
    init=st.sampled_from(["kaiming_uniform", "gaussian", "pissa", "olora"]),
)
module_configs = st.builds(LoRAConfig, module_name_pattern=patterns, embedding_pattern=st.none() | patterns, params=lora_params)
parameter_configs = st.builds(
    LoRAConfig, parameter_pattern=patterns, parameters_transposed=st.booleans(), module_name_pattern=st.none() | patterns, params=lora_params
)
lora_configs = st.one_of(module_configs, parameter_configs)
full_configs = st.builds(FullTuneConfig, module_name_pattern=patterns)
any_configs = st.recursive(
    st.one_of(lora_configs, full_configs),
    lambda members: st.builds(PeftStackConfig, methods=st.lists(members, min_size=1, max_size=3)),
    max_leaves=6,
)


@settings(deadline=None)
@given(any_configs)
def test_json_round_trip_is_exact(config):
    text = config.model_dump_json()

    parsed = config_from_json(text)

    assert parsed == config
    assert type(parsed) is type(config)
    assert parsed.model_dump_json() == text


def test_json_uses_kind_and_plain_pattern_strings():
    config = LoRAConfig(module_name_pattern=r".*\.q_proj", params=LoRAParameters(r=4, alpha=8))

    data = config.model_dump(mode="json")

    assert data["kind"] == "lora"
    assert data["module_name_pattern"] == r".*\.q_proj"
    assert data["params"]["r"] == 4


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"init": "orthogonal"}, "init"),
    ],
)
def test_lora_parameters_reject_invalid_values(kwargs, field):
    with pytest.raises(ValidationError) as caught:
        LoRAParameters(**kwargs)

    assert caught.value.errors()[0]["loc"] == (field,)
    assert field in str(caught.value)


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="rank"):
        LoRAParameters(rank=4)


@pytest.mark.parametrize("pattern", ["layers.(", ["q_proj", "v_proj["]])
def test_pattern_that_does_not_compile_is_rejected(pattern):
    with pytest.raises(ValidationError, match="module_name_pattern .* is not a valid regular expression"):
        LoRAConfig(module_name_pattern=pattern)


@pytest.mark.parametrize("pattern", ["", [], ["q_proj", ""]])
def test_empty_pattern_is_rejected(pattern):
    with pytest.raises(ValidationError, match="module_name_pattern"):
        FullTuneConfig(module_name_pattern=pattern)


def test_empty_stack_is_rejected():
    with pytest.raises(ValidationError, match="methods"):
        PeftStackConfig(methods=[])


def test_rank_above_layer_size_is_valid():
    params = LoRAParameters(r=4096, alpha=1.0)

    assert params.r == 4096


def test_scale_follows_rslora():
    assert LoRAParameters(r=4, alpha=8).scale == 2.0
    assert LoRAParameters(r=4, alpha=8, use_rslora=True).scale == 4.0
    assert math.isclose(LoRAParameters(r=3, alpha=1, use_rslora=True).scale, 1 / math.sqrt(3))


def test_configs_are_frozen():
    config = LoRAConfig(module_name_pattern="x")

    with pytest.raises(ValidationError):
        config.module_name_pattern = "y"


def test_peft_method_from_config_dispatches_on_kind():
    stack = PeftStackConfig(methods=[LoRAConfig(module_name_pattern="a"), FullTuneConfig(module_name_pattern="b")])

    method = peft_method_from_config(config_from_json(stack.model_dump_json()))

    assert isinstance(method, PeftStack)
    assert [type(m) for m in method.methods] == [LoRA, FullTune]


def test_peft_method_from_config_rejects_other_types():
    with pytest.raises(TypeError, match="config_from_json"):
        peft_method_from_config({"kind": "lora"})


@pytest.mark.parametrize(
    ("build", "hint"),
    [
        (lambda: LoRAConfig(target_modules=["q"]), "module_name_pattern"),
        (lambda: LoRAParameters(lora_alpha=4), "calls it alpha"),
        (lambda: LoRAConfig(module_name_pattern="x", r=4), "params.r"),
    ],
)
def test_peft_field_names_point_to_ours(build, hint):
    with pytest.raises(ValidationError, match=hint):
        build()

"""Interop with Hugging Face PEFT adapter folders, with the real peft package as the oracle."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftpeft import LoRAConfig, LoRAParameters, PeftStackConfig, functional_forward, peft_method_from_config, spec_of
from ftpeft.io import FtpeftWarning, load_hf_peft_adapter, read_hf_peft_config, replace_prefix, save_hf_peft_adapter

from conftest import randomise_lora_b, state_of, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def peft_saved(model, directory, **lora_kwargs):
    """Save a peft adapter with random non-zero B (init_lora_weights=False) and return the peft model."""
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(directory)
    return peft_model.eval()


def output_of(result):
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


CASES = {
    "llama": (tiny_llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], rank_pattern={"down_proj": 2}, alpha_pattern={"k_proj": 3})),
    "gpt2": (tiny_gpt2, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_rslora=True)),
    "bert": (tiny_bert, dict(r=2, lora_alpha=2, target_modules=r".*\.(query|value)")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_saved_by_peft_loads_into_ftpeft(name, tmp_path):
    build, kwargs = CASES[name]
    model = build()
    peft_model = peft_saved(model, tmp_path, **kwargs)
    base = state_of(model)

    config, adapter = load_hf_peft_adapter(tmp_path, base=base)
    method = peft_method_from_config(config)
    ours = output_of(functional_forward(model, method)({**base, **adapter}, input_ids=IDS))

    torch.testing.assert_close(ours, output_of(peft_model(input_ids=IDS)), rtol=1e-5, atol=1e-5)
    merged = method.merge({**base, **adapter})
    theirs = peft_model.merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CASES))
def test_adapter_saved_by_ftpeft_loads_into_peft(name, tmp_path):
    build, kwargs = CASES[name]
    model = build()
    peft_saved(model, tmp_path / "from_peft", **kwargs)
    base = state_of(model)
    config, adapter = load_hf_peft_adapter(tmp_path / "from_peft", base=base)
    adapter = {k: v + 0.01 for k, v in adapter.items()}

    save_hf_peft_adapter(tmp_path / "ours", config, adapter)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    ours = output_of(functional_forward(model, peft_method_from_config(config))({**base, **adapter}, input_ids=IDS))

    torch.testing.assert_close(output_of(peft_model(input_ids=IDS)), ours, rtol=1e-5, atol=1e-5)


def test_ftpeft_trained_adapter_round_trips_through_peft(tmp_path):
    model = tiny_llama()
    config = LoRAConfig(module_name_pattern=["q_proj", "v_proj"], params=LoRAParameters(r=4, alpha=16, use_rslora=True))
    method = peft_method_from_config(config)
    tree = randomise_lora_b(method.inject(state_of(model), generator=torch.Generator().manual_seed(0)))
    adapter = {k: v for k, v in tree.items() if "lora_" in k}

    save_hf_peft_adapter(tmp_path, config, adapter)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()

    ours = functional_forward(model, method)(tree, input_ids=IDS).logits
    torch.testing.assert_close(peft_model(input_ids=IDS).logits, ours, rtol=1e-5, atol=1e-5)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["target_modules"] == ["q_proj", "v_proj"]
    assert written["use_rslora"] is True
    assert list(written) == sorted(written)
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == {
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{m}.weight" for i in range(2) for p in ("q_proj", "v_proj") for m in "AB"
    }


def write_adapter(directory, config, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})


class Square(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x):
        return self.w(x)


@pytest.mark.parametrize(("use_rslora", "expected"), [(True, 4.0), (False, 2.0), (None, 2.0)])
def test_rslora_scale_comes_from_config(tmp_path, use_rslora, expected):
    # W = 0, A = 0.25, B = 1, r = alpha = 4: B A x = [2, 2] for x = [1, 1]; s is 2 with rsLoRA, 1 without.
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["w"]}
    if use_rslora is not None:
        config["use_rslora"] = use_rslora
    write_adapter(tmp_path / "a", config, {"base_model.model.w.lora_A.weight": torch.full((4, 2), 0.25), "base_model.model.w.lora_B.weight": torch.ones(2, 4)})
    model, base = Square(), {"w.weight": torch.zeros(2, 2)}
    x = torch.ones(2)

    loaded, adapter = load_hf_peft_adapter(tmp_path / "a", base=base)
    from_files = functional_forward(model, peft_method_from_config(loaded))({**base, **adapter}, x)
    in_memory_config = LoRAConfig(module_name_pattern=["w"], params=LoRAParameters(r=4, alpha=4, use_rslora=bool(use_rslora)))
    in_memory = functional_forward(model, peft_method_from_config(in_memory_config))(
        {**base, "w.lora_A": torch.full((4, 2), 0.25), "w.lora_B": torch.ones(2, 4)}, x
    )
    save_hf_peft_adapter(tmp_path / "b", loaded, adapter)
    reloaded, _ = load_hf_peft_adapter(tmp_path / "b", base=base)

    torch.testing.assert_close(from_files, torch.full((2,), expected))
    torch.testing.assert_close(in_memory, torch.full((2,), expected))
    assert reloaded.params.use_rslora is bool(use_rslora)


def test_binding_with_prefix_rule(tmp_path):
    base = {"language_model.model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4)}
    lora_a, lora_b = torch.randn(2, 4), torch.randn(4, 2)
    disk_keys = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": lora_a,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": lora_b,
    }
    write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}, disk_keys)

    with pytest.raises(ValueError, match="bind to no base weight: 'model.layers.0.self_attn.q_proj.lora_A'"):
        load_hf_peft_adapter(tmp_path / "a", base=base)

    rule = replace_prefix("model", "language_model.model")
    config, adapter = load_hf_peft_adapter(tmp_path / "a", base=base, key_map=rule)
    method = peft_method_from_config(config)
    x = torch.randn(3, 4)
    layer = "language_model.model.layers.0.self_attn.q_proj"
    merged = method.merge({**base, **adapter})[f"{layer}.weight"]

    torch.testing.assert_close(x @ merged.T - x @ base[f"{layer}.weight"].T, (x @ lora_a.T) @ lora_b.T)
    save_hf_peft_adapter(tmp_path / "b", config, adapter, key_map=rule)
    assert load_file(tmp_path / "b" / "adapter_model.safetensors").keys() == disk_keys.keys()


def test_compile_and_ddp_prefixes_are_removed_and_never_written(tmp_path):
    base = {"layers.0.q.weight": torch.randn(4, 4)}
    tensors = {
        "base_model.model._orig_mod.layers.0.q.lora_A.weight": torch.randn(2, 4),
        "base_model.model._orig_mod.layers.0.q.lora_B.weight": torch.randn(4, 2),
    }
    write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}, tensors)

    config, adapter = load_hf_peft_adapter(tmp_path / "a", base=base)
    save_hf_peft_adapter(tmp_path / "b", config, adapter)
    config_again, adapter_again = load_hf_peft_adapter(tmp_path / "b", base=base)
    save_hf_peft_adapter(tmp_path / "c", config_again, adapter_again)

    assert set(adapter) == {"layers.0.q.lora_A", "layers.0.q.lora_B"}
    assert set(load_file(tmp_path / "b" / "adapter_model.safetensors")) == {"base_model.model.layers.0.q.lora_A.weight", "base_model.model.layers.0.q.lora_B.weight"}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_module_prefix_from_ddp_is_removed(tmp_path):
    tensors = {"base_model.model.module.q.lora_A.weight": torch.randn(2, 4), "base_model.model.module.q.lora_B.weight": torch.randn(4, 2)}
    write_adapter(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}, tensors)

    _, adapter = load_hf_peft_adapter(tmp_path, base={"q.weight": torch.zeros(4, 4)})

    assert set(adapter) == {"q.lora_A", "q.lora_B"}


def test_unknown_fields_are_kept_with_a_warning(tmp_path):
    tensors = {"base_model.model.q.lora_A.weight": torch.randn(2, 4), "base_model.model.q.lora_B.weight": torch.randn(4, 2)}
    write_adapter(tmp_path / "a", {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"], "future_option": {"x": 1}}, tensors)

    with pytest.warns(FtpeftWarning, match="future_option"):
        hf_config = read_hf_peft_config(tmp_path / "a")
    save_hf_peft_adapter(tmp_path / "b", hf_config.lora, load_hf_peft_adapter(tmp_path / "a")[1], extra=hf_config.extra)

    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["future_option"] == {"x": 1}


@pytest.mark.parametrize(("field", "value"), [("use_qalora", True), ("bias", "all"), ("init_lora_weights", "loftq"), ("layers_to_transform", [0])])
def test_unsupported_field_is_named(tmp_path, field, value):
    write_adapter(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"], field: value}, {"base_model.model.q.lora_A.weight": torch.zeros(2, 4), "base_model.model.q.lora_B.weight": torch.zeros(4, 2)})

    with pytest.raises(ValueError, match=field):
        load_hf_peft_adapter(tmp_path)


def test_adapter_for_another_base_is_rejected(tmp_path):
    tensors = {"base_model.model.q.lora_A.weight": torch.randn(2, 8), "base_model.model.q.lora_B.weight": torch.randn(4, 2)}
    write_adapter(tmp_path, {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}, tensors)

    with pytest.raises(ValueError, match=r"'q'.*\(2, 8\).*another base model"):
        load_hf_peft_adapter(tmp_path, base={"q.weight": torch.zeros(4, 4)})


def test_modules_to_save_become_full_tune_member(tmp_path):
    config = tiny_gpt2().config
    config.pad_token_id = 0
    model = transformers.GPT2ForSequenceClassification(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft_saved(model, tmp_path / "a", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["score"])
    with torch.no_grad():
        peft_model.base_model.model.score.modules_to_save["default"].weight.add_(1.0)
    peft_model.save_pretrained(tmp_path / "a")
    base = state_of(model)

    config, adapter = load_hf_peft_adapter(tmp_path / "a", base=base)
    method = peft_method_from_config(config)
    tree = {**base, **adapter}
    ours = functional_forward(model, method)(tree, input_ids=IDS).logits

    assert isinstance(config, PeftStackConfig)
    assert "score.weight" in method.trainable_keys(tree)
    torch.testing.assert_close(ours, peft_model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    save_hf_peft_adapter(tmp_path / "b", config, adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "b").eval()
    torch.testing.assert_close(reloaded(input_ids=IDS).logits, ours, rtol=1e-5, atol=1e-5)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_hf_peft_adapter(tmp_path / "nowhere")


def test_lora_bias_round_trips_with_peft(tmp_path):
    model = tiny_bert()
    peft_model = peft_saved(model, tmp_path / "a", r=2, lora_alpha=4, target_modules=["query", "value"], lora_bias=True)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_B["default"].bias.normal_()
    peft_model.save_pretrained(tmp_path / "a")
    base = state_of(model)

    config, adapter = load_hf_peft_adapter(tmp_path / "a", base=base)
    method = peft_method_from_config(config)
    ours = functional_forward(model, method)({**base, **adapter}, input_ids=IDS).last_hidden_state
    save_hf_peft_adapter(tmp_path / "b", config, adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "b").eval()

    assert config.params.lora_bias
    assert "encoder.layer.0.attention.self.query.lora_bias" in adapter
    torch.testing.assert_close(ours, peft_model(input_ids=IDS).last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded(input_ids=IDS).last_hidden_state, ours, rtol=1e-5, atol=1e-5)
    merged = method.merge({**base, **adapter})
    theirs = peft_model.merge_and_unload().state_dict()
    key = "encoder.layer.0.attention.self.query.bias"
    torch.testing.assert_close(merged[key], theirs[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_adapter_round_trips_with_peft(init, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[3, 8, 1, 30]])

    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=spec_of(model))
    method = peft_method_from_config(config)
    # inject turns the original base into the residual W - s * B0 @ A0; the loaded leaves replace B0 and A0.
    tree = {**method.inject(state_of(model)), **adapter}
    out = functional_forward(model, method)(tree, ids).logits
    save_hf_peft_adapter(tmp_path / "ours", config, adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")

    assert config.params.init == init
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["init_lora_weights"] == init
    torch.testing.assert_close(out, reference(ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)

"""DoRA: a trainable magnitude per output row over the normalised adapted weight, in every layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, spec_of
from ftpeft.io import load_hf_peft_adapter, save_hf_peft_adapter
from ftpeft.maps import Drop

from conftest import TwoLayerMLP, tiny_gpt2, tiny_llama


def dora(pattern, r=2, alpha=4.0, **params):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha, use_dora=True, **params)))


def trained(method, model, seed=1):
    """Return the injected tree with random A and B and a perturbed magnitude, as after some training."""
    tree = method.inject(dict(model.state_dict()), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for key, value in tree.items():
        if key.endswith(("lora_A", "lora_B")):
            value = torch.randn(value.shape, generator=generator) * 0.3
        elif key.endswith("lora_magnitude_vector"):
            # Perturbed per row, so a norm taken along the wrong axis shows.
            value = value * (1.0 + torch.rand(value.shape, generator=generator))
        result[key] = value
    return result


def adapter_of(tree):
    return {k: v for k, v in tree.items() if "lora" in k}


def test_magnitude_starts_at_row_norms():
    model = TwoLayerMLP()
    tree = dora(["up"]).inject(dict(model.state_dict()))

    torch.testing.assert_close(tree["up.lora_magnitude_vector"], model.up.weight.detach().norm(dim=1))
    assert tree["up.lora_magnitude_vector"].shape == (10,)


def test_linear_forward_matches_math():
    model = TwoLayerMLP()
    method = dora(["up"])
    tree = trained(method, model)
    x = torch.randn(5, 6)

    out = functional_forward(model, method)(tree, x)

    adapted = tree["up.weight"] + 2.0 * tree["up.lora_B"] @ tree["up.lora_A"]
    scale = tree["up.lora_magnitude_vector"] / adapted.norm(dim=1)
    hidden = x @ (scale[:, None] * adapted).T + tree["up.bias"]
    expected = F.linear(torch.relu(hidden), tree["down.weight"], tree["down.bias"])
    torch.testing.assert_close(out, expected)


def test_norm_is_detached_from_gradient():
    model = nn.Linear(6, 4)
    method = dora(".*")
    tree = trained(method, model)
    adapter, base = adapter_of(tree), {k: v for k, v in tree.items() if "lora" not in k}
    x = torch.randn(3, 6)
    fn = functional_forward(model, method)

    def math(adapter):
        adapted = base["weight"] + 2.0 * adapter["lora_B"] @ adapter["lora_A"]
        scale = adapter["lora_magnitude_vector"] / adapted.norm(dim=1).detach()
        return (x @ (scale[:, None] * adapted).T + base["bias"]).square().sum()

    grads = torch.func.grad(lambda a: fn({**base, **a}, x).square().sum())(adapter)
    expected = torch.func.grad(math)(adapter)

    for key in adapter:
        torch.testing.assert_close(grads[key], expected[key], msg=key)


def test_dropout_applies_to_adapter_share_only():
    model = nn.Linear(6, 4)
    method = dora(".*", dropout=0.5)
    tree = trained(method, model)
    x = torch.randn(3, 6)
    model.train()

    torch.manual_seed(7)
    out = functional_forward(model, method)(tree, x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)

    weight, bias = tree["weight"], tree["bias"]
    lora = dropped @ tree["lora_A"].T @ tree["lora_B"].T * 2.0
    factor = tree["lora_magnitude_vector"] / (weight + 2.0 * tree["lora_B"] @ tree["lora_A"]).norm(dim=1)
    expected = x @ weight.T + bias + (factor - 1) * (dropped @ weight.T) + factor * lora
    torch.testing.assert_close(out, expected)


def test_merge_equals_forward_and_unmerge_restores():
    model = TwoLayerMLP()
    method = dora(["up", "down"])
    tree = trained(method, model)
    x = torch.randn(5, 6)

    out = functional_forward(model, method)(tree, x)
    norms = method.weight_norms(tree)
    merged = method.merge(tree)
    restored = method.unmerge(merged, {**adapter_of(tree), **norms})

    assert set(merged) == set(model.state_dict())
    torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), out)
    # Every row of a merged DoRA weight has the magnitude as its norm.
    torch.testing.assert_close(merged["up.weight"].norm(dim=1), tree["up.lora_magnitude_vector"])
    for key in tree:
        torch.testing.assert_close(restored[key], tree[key], msg=key)


def test_unmerge_without_norms_is_rejected():
    model = TwoLayerMLP()
    method = dora(["up"])
    tree = trained(method, model)

    with pytest.raises(ValueError, match=r"'up.lora_weight_norm'.*weight_norms"):
        method.unmerge(method.merge(tree), adapter_of(tree))


def test_merge_map_keeps_norms_for_its_inverse():
    model = TwoLayerMLP()
    method = dora(["up"])
    tree = trained(method, model)

    merged = method.merge_map()(tree)
    restored = method.merge_map().inverse()(merged)

    assert set(merged) == set(tree) | {"up.lora_weight_norm"}
    torch.testing.assert_close(merged["up.lora_weight_norm"], method.weight_norms(tree)["up.lora_weight_norm"])
    drop = Drop(tuple(sorted(adapter_of(merged))))
    torch.testing.assert_close((method.merge_map() >> drop)(tree)["up.weight"], method.merge(tree)["up.weight"])
    assert set(restored) == set(tree)
    for key in tree:
        torch.testing.assert_close(restored[key], tree[key], msg=key)


def copy_dora_into_peft(peft_model, tree):
    """Copy ftpeft's leaves (lora_A, lora_B, magnitude) into the matching parameters of a peft model."""
    state = {}
    for key in peft_model.state_dict():
        if ".lora_" not in key:
            continue
        ours = key.removeprefix("base_model.model.").replace(".default", "")
        ours = ours.removesuffix(".weight") if ".lora_A." in ours or ".lora_B." in ours or "magnitude" in ours else ours
        state[key] = tree[ours]
    peft_model.load_state_dict(state, strict=False)


def test_conv1d_transposed_layout_matches_peft():
    peft = pytest.importorskip("peft")
    model = tiny_gpt2()
    method = dora(["c_attn", "c_proj"], fan_in_fan_out=True)
    tree = trained(method, model)
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj"], use_dora=True, fan_in_fan_out=True)
    )
    copy_dora_into_peft(reference, tree)
    ids = torch.tensor([[1, 5, 9, 2]])

    out = functional_forward(model, method)(tree, ids).logits
    merged = method.merge(tree)
    restored = method.unmerge(merged, {**adapter_of(tree), **method.weight_norms(tree)})

    # The Conv1D weight is (in, out): the magnitude is per column, one per output.
    assert tree["transformer.h.0.attn.c_attn.lora_magnitude_vector"].shape == (96,)
    torch.testing.assert_close(out, reference(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(functional_forward(model)(merged, ids).logits, out, atol=1e-5, rtol=0)
    for key in tree:
        torch.testing.assert_close(restored[key], tree[key], msg=key)


def test_conv2d_matches_peft():
    peft = pytest.importorskip("peft")
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 2, 1))
    method = dora(["0", "2"])
    tree = trained(method, model)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True))
    copy_dora_into_peft(reference, tree)
    x = torch.randn(2, 3, 6, 6)

    out = functional_forward(model, method)(tree, x)
    merged = method.merge(tree)
    restored = method.unmerge(merged, {**adapter_of(tree), **method.weight_norms(tree)})

    assert tree["0.lora_magnitude_vector"].shape == (1, 5, 1, 1)
    torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.func.functional_call(model, merged, (x,)), out, atol=1e-5, rtol=0)
    for key in tree:
        torch.testing.assert_close(restored[key], tree[key], msg=key)


def test_llama_adapter_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    reference = peft.get_peft_model(
        copy.deepcopy(model),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True, init_lora_weights=False),
    )
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if "magnitude" in name:
                parameter.mul_(1.5)
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[3, 8, 1, 30]])

    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=spec_of(model))
    out = functional_forward(model, peft_method_from_config(config))({**model.state_dict(), **adapter}, ids).logits
    save_hf_peft_adapter(tmp_path / "ours", config, adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")

    # peft saves a targeted embedding's table too; ftpeft keeps it as a FullTune leaf and writes it back in place.
    lora, full_tune = config.methods
    assert lora.params.use_dora
    assert full_tune.module_name_pattern == r"model\.embed_tokens"
    assert "model.embed_tokens.lora_magnitude_vector" in adapter
    assert "model.embed_tokens.weight" in adapter
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] is None
    torch.testing.assert_close(out, reference(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=0, rtol=0)

"""LoRA on mixture-of-experts weights stored as one 3-D tensor, targeted by parameter_pattern."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, spec_of
from ftpeft.io import load_hf_peft_adapter, save_hf_peft_adapter

from conftest import result_shapes


class Experts(nn.Module):
    """Three experts stored as one (E, out, in) tensor (or (E, in, out) when transposed), each applied to its own rows."""

    def __init__(self, experts=3, d_in=5, d_out=4, transposed=False):
        super().__init__()
        self.is_transposed = transposed
        shape = (experts, d_in, d_out) if transposed else (experts, d_out, d_in)
        self.weight_stack = nn.Parameter(torch.randn(shape))

    def forward(self, x, expert_ids):
        rows = []
        for row, expert in zip(x, expert_ids.tolist()):
            weight = self.weight_stack[expert]
            rows.append(row @ weight if self.is_transposed else F.linear(row, weight))
        return torch.stack(rows)


def experts_lora(r=2, alpha=4.0, transposed=False, **params):
    config = LoRAConfig(parameter_pattern=["weight_stack"], parameters_transposed=transposed, params=LoRAParameters(r=r, alpha=alpha, **params))
    return peft_method_from_config(config)


def random_leaves(tree, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) if "lora" in k else v) for k, v in tree.items()}


def per_expert_delta(lora_a, lora_b, experts, rank, scale):
    """Expert e's update: rows e*r .. e*r+r-1 of A, and columns e, e+E, e+2E, ... of B."""
    return torch.stack([scale * lora_b[:, e::experts] @ lora_a[e * rank : (e + 1) * rank] for e in range(experts)])


def test_expert_leaves_use_packed_layout():
    tree = experts_lora(r=2).inject(spec_of(Experts()))

    assert tree["weight_stack.lora_A"].shape == (6, 5)
    assert tree["weight_stack.lora_B"].shape == (4, 6)


def test_expert_forward_and_merge_match_packing():
    model = Experts()
    method = experts_lora()
    tree = random_leaves(method.inject(dict(model.state_dict())))
    x, expert_ids = torch.randn(6, 5), torch.tensor([0, 2, 1, 2, 0, 1])

    out = functional_forward(model, method)(tree, x, expert_ids)
    merged = method.merge(tree)
    restored = method.unmerge(merged, {k: v for k, v in tree.items() if "lora" in k})

    adapted = tree["weight_stack"] + per_expert_delta(tree["weight_stack.lora_A"], tree["weight_stack.lora_B"], 3, 2, 2.0)
    expected = torch.stack([adapted[e] @ row for row, e in zip(x, expert_ids.tolist())])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(merged["weight_stack"], adapted)
    torch.testing.assert_close(restored["weight_stack"], tree["weight_stack"])


def test_expert_view_builds_no_dense_update():
    model = Experts()
    method = experts_lora()
    tree = random_leaves(method.inject(dict(model.state_dict())))

    shapes = result_shapes(lambda: functional_forward(model, method)(tree, torch.randn(2, 5), torch.tensor([1, 2])))

    assert (3, 4, 5) not in shapes


def test_transposed_experts_use_in_out_layout():
    model = Experts(transposed=True)
    method = experts_lora(transposed=True)
    tree = random_leaves(method.inject(dict(model.state_dict())))
    x, expert_ids = torch.randn(4, 5), torch.tensor([2, 0, 1, 2])

    out = functional_forward(model, method)(tree, x, expert_ids)

    # The stack is (E, in, out), so each expert's update is transposed into it.
    delta = per_expert_delta(tree["weight_stack.lora_A"], tree["weight_stack.lora_B"], 3, 2, 2.0).transpose(1, 2)
    adapted = tree["weight_stack"] + delta
    torch.testing.assert_close(out, torch.stack([row @ adapted[e] for row, e in zip(x, expert_ids.tolist())]))
    torch.testing.assert_close(method.merge(tree)["weight_stack"], adapted)


def test_transposed_experts_need_flag():
    with pytest.raises(ValueError, match=r"'weight_stack'.*\(E, in, out\).*parameters_transposed=True"):
        functional_forward(Experts(transposed=True), experts_lora())


def test_experts_reject_dropout():
    with pytest.raises(ValueError, match=r"'weight_stack'.*dropout > 0"):
        experts_lora(dropout=0.1).inject(spec_of(Experts()))


def tiny_mixtral(implementation):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, experts_implementation=implementation,
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(config).eval()


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm"])
def test_mixtral_experts_match_peft(implementation, tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_mixtral(implementation)
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets, init_lora_weights=False)
    )
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[1, 5, 7, 9, 11]])

    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=spec_of(model))
    method = peft_method_from_config(config)
    tree = {**model.state_dict(), **adapter}
    out = functional_forward(model, method)(tree, ids).logits
    merged = functional_forward(model)(method.merge(tree), ids).logits
    save_hf_peft_adapter(tmp_path / "ours", config, adapter, base=spec_of(model))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")

    # peft writes target_parameters from a set, so their order varies.
    assert sorted(config.parameter_pattern) == [r"experts\.down_proj", r"experts\.gate_up_proj"]
    assert adapter["model.layers.0.mlp.experts.gate_up_proj.lora_A"].shape == (6, 16)
    assert adapter["model.layers.0.mlp.experts.down_proj.lora_A"].shape == (6, 8)
    torch.testing.assert_close(out, reference(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=0, rtol=0)


def test_expert_gradients_agree_across_implementations():
    eager, grouped = tiny_mixtral("eager"), tiny_mixtral("grouped_mm")
    method = peft_method_from_config(LoRAConfig(parameter_pattern=["gate_up_proj", "down_proj"], params=LoRAParameters(r=2, alpha=4)))
    tree = random_leaves(method.inject(dict(eager.state_dict())))
    adapter = {k: v for k, v in tree.items() if "lora" in k}
    frozen = {k: v for k, v in tree.items() if "lora" not in k}
    ids = torch.tensor([[3, 1, 4, 1, 5]])

    def loss(model):
        fn = functional_forward(model, method)
        return lambda adapter: fn({**frozen, **adapter}, ids).logits.square().mean()

    grads_eager = torch.func.grad(loss(eager))(adapter)
    grads_grouped = torch.func.grad(loss(grouped))(adapter)

    for key in adapter:
        torch.testing.assert_close(grads_eager[key], grads_grouped[key], atol=1e-5, rtol=1e-4, msg=key)
        assert grads_eager[key].abs().sum() > 0


def test_expert_adapter_needs_base_to_load_and_save(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_mixtral("eager")
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=["experts.down_proj"]))
    reference.save_pretrained(tmp_path / "peft")

    with pytest.raises(ValueError, match="target_parameters.*Pass base="):
        load_hf_peft_adapter(tmp_path / "peft")
    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=spec_of(model))
    with pytest.raises(ValueError, match="parameter_pattern.*Pass base="):
        save_hf_peft_adapter(tmp_path / "ours", config, adapter)


def test_sorted_base_keys_still_bind_experts(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_mixtral("eager")
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=[], target_parameters=targets, init_lora_weights=False))
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[2, 4, 6]])
    # A checkpoint lists its keys sorted, which puts down_proj before gate_up_proj; the leaf shapes decide.
    sorted_base = dict(sorted(spec_of(model).items()))

    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=sorted_base)
    out = functional_forward(model, peft_method_from_config(config))({**model.state_dict(), **adapter}, ids).logits

    torch.testing.assert_close(out, reference(ids).logits, atol=1e-5, rtol=0)


def tiny_gpt_oss():
    transformers = pytest.importorskip("transformers")
    config = transformers.GptOssConfig(
        vocab_size=50, hidden_size=16, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, num_local_experts=3, num_experts_per_tok=2, layer_types=["full_attention"],
    )
    torch.manual_seed(0)
    return transformers.GptOssForCausalLM(config).eval()


def test_gpt_oss_transposed_experts_round_trip_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_gpt_oss()
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=targets, init_lora_weights=False)
    )
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[1, 5, 7, 9]])

    # peft writes fan_in_fan_out false and reads is_transposed from the module; the leaf shapes show it.
    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=spec_of(model))
    out = functional_forward(model, peft_method_from_config(config))({**model.state_dict(), **adapter}, ids).logits
    save_hf_peft_adapter(tmp_path / "ours", config, adapter, base=spec_of(model))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")

    assert config.parameters_transposed
    assert not config.params.fan_in_fan_out
    torch.testing.assert_close(out, reference(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, atol=0, rtol=0)

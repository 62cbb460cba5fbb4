"""Tests of LoRA as a pure tree transform: inject, trainable keys, merge, unmerge."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftpeft import LoRAConfig, LoRAParameters, TensorSpec, peft_method_from_config, spec_of, split_trainable


def lora(pattern, r=2, alpha=4.0, **params):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha, **params)))


def attention_tree():
    """Four 4x4 projection weights over two layers, as in a tiny decoder."""
    return {
        f"layers.{i}.self_attn.{name}.weight": torch.randn(4, 4)
        for i in range(2)
        for name in ("q_proj", "v_proj")
    }


def test_inject_adds_a_and_b_with_lora_shapes():
    tree = {"lin.weight": torch.randn(3, 5), "lin.bias": torch.randn(3)}

    injected = lora(["lin"], r=2).inject(tree)

    assert list(injected) == ["lin.weight", "lin.bias", "lin.lora_A", "lin.lora_B"]
    assert injected["lin.lora_A"].shape == (2, 5)
    assert injected["lin.lora_B"].shape == (3, 2)
    assert torch.equal(injected["lin.lora_B"], torch.zeros(3, 2))
    assert injected["lin.weight"] is tree["lin.weight"]
    assert list(tree) == ["lin.weight", "lin.bias"]


def test_kaiming_uniform_init_bound_is_one_over_sqrt_in():
    tree = {"lin.weight": torch.randn(8, 400)}

    lora_a = lora(["lin"], r=64).inject(tree, generator=torch.Generator().manual_seed(0))["lin.lora_A"]

    bound = 1 / math.sqrt(400)
    assert lora_a.abs().max() <= bound
    assert lora_a.abs().max() > 0.95 * bound
    # A uniform variable on (-b, b) has standard deviation b / sqrt(3).
    assert abs(lora_a.std().item() - bound / math.sqrt(3)) < 0.05 * bound


def test_gaussian_init_std_is_one_over_r():
    tree = {"lin.weight": torch.randn(8, 500)}

    lora_a = lora(["lin"], r=16, init="gaussian").inject(tree, generator=torch.Generator().manual_seed(0))["lin.lora_A"]

    assert abs(lora_a.std().item() - 1 / 16) < 0.005
    assert abs(lora_a.mean().item()) < 0.005


def test_generator_makes_inject_reproducible():
    tree = {"lin.weight": torch.randn(3, 5)}
    method = lora(["lin"])

    first = method.inject(tree, generator=torch.Generator().manual_seed(7))
    second = method.inject(tree, generator=torch.Generator().manual_seed(7))

    assert torch.equal(first["lin.lora_A"], second["lin.lora_A"])


def test_half_precision_base_gets_float32_adapters():
    tree = {"lin.weight": torch.randn(3, 5, dtype=torch.bfloat16), "other.weight": torch.randn(2, 2, dtype=torch.float64)}

    injected = lora(["lin", "other"]).inject(tree)

    assert injected["lin.lora_A"].dtype == torch.float32
    assert injected["other.lora_B"].dtype == torch.float64


def test_inject_on_spec_plans_without_allocating():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4096, 11008), torch.nn.Linear(11008, 4096))

    planned = lora(r".*", r=16).inject(spec_of(model))

    assert all(isinstance(leaf, TensorSpec) for leaf in planned.values())
    assert planned["0.lora_A"] == TensorSpec((16, 4096), torch.float32, torch.device("meta"), adapter=True)
    assert not planned["0.weight"].adapter
    assert planned["1.lora_B"].shape == (4096, 16)


def test_inject_on_meta_tensors_returns_meta_adapters():
    tree = {"lin.weight": torch.empty(3, 5, device="meta")}

    injected = lora(["lin"]).inject(tree)

    assert injected["lin.lora_A"].device.type == "meta"
    assert injected["lin.lora_B"].device.type == "meta"


def test_misspelled_target_is_named():
    tree = attention_tree()

    with pytest.raises(ValueError, match="FAKE_TARGET_MODULE") as caught:
        lora(["q_proj", "FAKE_TARGET_MODULE"]).inject(tree)

    assert "'q_proj'" not in str(caught.value).split("matches no module")[0]
    assert "layers.0.self_attn.q_proj" in str(caught.value)


def test_single_target_creates_two_adapter_pairs():
    injected = lora(["q_proj"]).inject(attention_tree())

    adapter = sorted(k for k in injected if "lora_" in k)
    assert adapter == [
        "layers.0.self_attn.q_proj.lora_A",
        "layers.0.self_attn.q_proj.lora_B",
        "layers.1.self_attn.q_proj.lora_A",
        "layers.1.self_attn.q_proj.lora_B",
    ]


def test_regex_string_must_fullmatch_the_path():
    with pytest.raises(ValueError, match="must fullmatch the whole path"):
        lora("q_proj").inject(attention_tree())

    injected = lora(r"layers\.1\..*_proj").inject(attention_tree())

    assert sorted(k for k in injected if k.endswith("lora_A")) == [
        "layers.1.self_attn.q_proj.lora_A",
        "layers.1.self_attn.v_proj.lora_A",
    ]


def test_list_entry_matches_dotted_suffix_only_at_segment_boundary():
    tree = {"a.my_q_proj.weight": torch.randn(2, 2), "b.q_proj.weight": torch.randn(2, 2)}

    injected = lora(["q_proj"]).inject(tree)

    assert "b.q_proj.lora_A" in injected
    assert "a.my_q_proj.lora_A" not in injected


def test_non_matrix_weight_is_rejected_by_name():
    tree = {"norm.weight": torch.ones(4), "lin.weight": torch.randn(4, 4)}

    with pytest.raises(ValueError, match="'norm'.*shape \\(4,\\)"):
        lora(r".*").inject(tree)


def test_inject_twice_is_rejected():
    method = lora(["lin"])
    injected = method.inject({"lin.weight": torch.randn(2, 2)})

    with pytest.raises(ValueError, match="already contains LoRA leaves"):
        method.inject(injected)


def test_frozen_stays_frozen_through_grad_and_sgd():
    tree = {"embed.weight": torch.randn(5, 4), "norm.weight": torch.ones(4), "lin.weight": torch.randn(3, 4)}
    method = lora(["lin"])
    injected = method.inject(tree, generator=torch.Generator().manual_seed(0))
    trainable, frozen = split_trainable(method, injected)
    ids = torch.tensor([0, 3, 4])

    def loss(trainable, frozen):
        # y = (embed[ids] * norm.weight) @ (lin.weight + s B A)^T, written out by hand.
        scale = 4.0 / 2
        weight = frozen["lin.weight"] + scale * trainable["lin.lora_B"] @ trainable["lin.lora_A"]
        hidden = frozen["embed.weight"][ids] * frozen["norm.weight"]
        return (hidden @ weight.T).square().sum()

    grads = torch.func.grad(loss)(trainable, frozen)
    stepped = {k: v - 0.1 * grads[k] for k, v in trainable.items()}

    assert set(grads) == {"lin.lora_A", "lin.lora_B"}
    assert set(frozen) == {"embed.weight", "norm.weight", "lin.weight"}
    assert not torch.equal(stepped["lin.lora_B"], trainable["lin.lora_B"])
    for key in frozen:
        assert torch.equal(frozen[key], tree[key])
        assert frozen[key] is tree[key]


def test_merge_matches_formula_and_drops_adapter_keys():
    weight, lora_a, lora_b = torch.randn(3, 5), torch.randn(2, 5), torch.randn(3, 2)
    tree = {"lin.weight": weight, "lin.bias": torch.randn(3), "lin.lora_A": lora_a, "lin.lora_B": lora_b}

    merged = lora(["lin"], r=2, alpha=3.0).merge(tree)

    assert list(merged) == ["lin.weight", "lin.bias"]
    torch.testing.assert_close(merged["lin.weight"], weight + 1.5 * lora_b @ lora_a)
    assert merged["lin.bias"] is tree["lin.bias"]


def test_merge_uses_rslora_scale():
    tree = {"w.weight": torch.zeros(2, 2), "w.lora_A": torch.full((4, 2), 0.25), "w.lora_B": torch.ones(2, 4)}

    merged = lora(["w"], r=4, alpha=4.0, use_rslora=True).merge(tree)

    # s = 4 / sqrt(4) = 2; B @ A is all ones, so W' @ [1, 1] = [4, 4].
    torch.testing.assert_close(merged["w.weight"] @ torch.ones(2), torch.tensor([4.0, 4.0]))


def test_merge_rounds_once_to_bfloat16():
    weight = torch.randn(16, 16).to(torch.bfloat16)
    lora_a, lora_b = torch.randn(4, 16), torch.randn(16, 4)
    tree = {"w.weight": weight, "w.lora_A": lora_a, "w.lora_B": lora_b}

    merged = lora(["w"], r=4, alpha=4.0).merge(tree)["w.weight"]

    expected = (weight.double() + lora_b.double() @ lora_a.double()).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16
    # A single rounding of the float32 sum lands within one bfloat16 step of the exact result.
    assert (merged.double() - expected.double()).abs().max() <= expected.double().abs().max() * 2**-7


def test_merge_and_unmerge_reject_wrong_adapter_shapes():
    tree = {"w.weight": torch.zeros(3, 5), "w.lora_A": torch.zeros(2, 4), "w.lora_B": torch.zeros(3, 2)}

    with pytest.raises(ValueError, match=r"'w'.*\(2, 4\).*\(2, 5\)"):
        lora(["w"], r=2).merge(tree)


def test_merge_names_missing_adapter_key():
    with pytest.raises(KeyError, match="w.lora_A"):
        lora(["w"]).merge({"w.weight": torch.zeros(2, 2)})


def test_unmerge_rejects_foreign_adapter_keys():
    method = lora(["w"])
    merged = {"w.weight": torch.zeros(2, 2)}

    with pytest.raises(ValueError, match="other.lora_A"):
        method.unmerge(merged, {"w.lora_A": torch.zeros(2, 2), "w.lora_B": torch.zeros(2, 2), "other.lora_A": torch.zeros(1)})


dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])


@settings(max_examples=40, deadline=None)
@given(
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 12),
    rank=st.integers(1, 16),
    alpha=st.floats(0.1, 64.0),
    use_rslora=st.booleans(),
    dtype=dtypes,
    seed=st.integers(0, 2**16),
)
def test_unmerge_inverts_merge(out_features, in_features, rank, alpha, use_rslora, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    method = lora(["m.w"], r=rank, alpha=alpha, use_rslora=use_rslora)
    base = {"m.w.weight": torch.randn(out_features, in_features, generator=generator).to(dtype), "m.w.bias": torch.randn(out_features).to(dtype)}
    tree = method.inject(base, generator=generator)
    tree["m.w.lora_B"] = torch.randn(out_features, rank, generator=generator).to(tree["m.w.lora_B"].dtype)
    adapter = {k: tree[k] for k in ("m.w.lora_A", "m.w.lora_B")}

    restored = method.unmerge(method.merge(tree), adapter)

    assert list(restored) == list(tree)
    delta_size = (method.config.params.scale * tree["m.w.lora_B"].double() @ tree["m.w.lora_A"].double()).abs().max().item()
    magnitude = base["m.w.weight"].double().abs().max().item() + delta_size
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype] * max(magnitude, 1.0) * 2
    torch.testing.assert_close(restored["m.w.weight"], tree["m.w.weight"], atol=tolerance, rtol=0)
    assert restored["m.w.bias"] is tree["m.w.bias"]


def test_methods_never_modify_their_inputs():
    tree = {"w.weight": torch.randn(3, 3), "w.bias": torch.randn(3), "w.lora_A": torch.randn(2, 3), "w.lora_B": torch.randn(3, 2)}
    before = {k: (v.clone(), v._version, v.data_ptr(), v.requires_grad) for k, v in tree.items()}
    keys_before = list(tree)
    method = lora(["w"])

    merged = method.merge(tree)
    method.unmerge(merged, {k: tree[k] for k in ("w.lora_A", "w.lora_B")})
    method.trainable_keys(tree)
    split_trainable(method, tree)
    method.inject({k: tree[k] for k in ("w.weight", "w.bias")})

    assert list(tree) == keys_before
    for key, (value, version, pointer, requires_grad) in before.items():
        assert torch.equal(tree[key], value)
        assert tree[key]._version == version
        assert tree[key].data_ptr() == pointer
        assert tree[key].requires_grad == requires_grad


def test_merge_on_spec_drops_adapter_keys():
    method = lora(["w"])
    planned = method.inject(spec_of({"w.weight": torch.empty(3, 3, device="meta")}))

    assert list(method.merge(planned)) == ["w.weight"]


def test_rank_and_alpha_patterns_set_per_module_values():
    tree = {"layers.0.q_proj.weight": torch.randn(4, 6), "layers.0.v_proj.weight": torch.randn(4, 6)}
    config = LoRAConfig(
        module_name_pattern=["q_proj", "v_proj"],
        params=LoRAParameters(r=2, alpha=4.0),
        rank_pattern={"v_proj": 3},
        alpha_pattern={r"layers\.0\.v_proj": 9.0},
    )
    method = peft_method_from_config(config)

    injected = method.inject(tree)
    injected["layers.0.v_proj.lora_B"] = torch.randn(4, 3)
    merged = method.merge(injected)

    assert injected["layers.0.q_proj.lora_A"].shape == (2, 6)
    assert injected["layers.0.v_proj.lora_A"].shape == (3, 6)
    assert config.scale_of("layers.0.q_proj") == 2.0
    assert config.scale_of("layers.0.v_proj") == 3.0
    expected = tree["layers.0.v_proj.weight"] + 3.0 * injected["layers.0.v_proj.lora_B"] @ injected["layers.0.v_proj.lora_A"]
    torch.testing.assert_close(merged["layers.0.v_proj.weight"], expected)


def test_rank_pattern_matches_only_at_segment_boundary():
    config = LoRAConfig(module_name_pattern="x", params=LoRAParameters(r=2), rank_pattern={"proj": 5})

    assert config.rank_of("layers.0.proj") == 5
    assert config.rank_of("layers.0.q_proj") == 2


def test_invalid_rank_pattern_is_rejected():
    with pytest.raises(ValueError, match="rank_pattern"):
        LoRAConfig(module_name_pattern="x", rank_pattern={"q": 0})


def test_fan_in_fan_out_uses_transposed_layout():
    # A weight stored (in, out) = (5, 3), as transformers' Conv1D stores it.
    tree = {"c_attn.weight": torch.randn(5, 3)}
    method = lora(["c_attn"], r=2, alpha=2.0, fan_in_fan_out=True)

    injected = method.inject(tree)
    injected["c_attn.lora_B"] = torch.randn(3, 2)
    merged = method.merge(injected)

    assert injected["c_attn.lora_A"].shape == (2, 5)
    assert injected["c_attn.lora_B"].shape == (3, 2)
    x = torch.randn(4, 5)
    expected = x @ tree["c_attn.weight"] + (x @ injected["c_attn.lora_A"].T) @ injected["c_attn.lora_B"].T
    torch.testing.assert_close(x @ merged["c_attn.weight"], expected)


def test_rank_pattern_key_that_matches_no_target_is_named():
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["q"], rank_pattern={"dwn": 2}))

    with pytest.raises(ValueError, match="rank_pattern key 'dwn'"):
        method.inject({"q.weight": torch.zeros(2, 2)})


def lora_bias_tree():
    # in = out = 2, r = 2, alpha = 8 (s = 4), W = 0, base bias [1, 1], A = I, B = 0, LoRA bias [0.5, -0.5].
    return {
        "lin.weight": torch.zeros(2, 2),
        "lin.bias": torch.ones(2),
        "lin.lora_A": torch.eye(2),
        "lin.lora_B": torch.zeros(2, 2),
        "lin.lora_bias": torch.tensor([0.5, -0.5]),
    }


class OneLinear(torch.nn.Module):
    def __init__(self, bias: bool = True):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2, bias=bias)

    def forward(self, x):
        return self.lin(x)


def test_lora_bias_forward_merge_and_unmerge():
    from ftpeft import functional_forward

    method = lora(["lin"], r=2, alpha=8.0, lora_bias=True)
    tree = lora_bias_tree()

    out = functional_forward(OneLinear(), method)(tree, torch.randn(5, 2))
    merged = method.merge(tree)
    restored = method.unmerge(merged, {k: tree[k] for k in ("lin.lora_A", "lin.lora_B", "lin.lora_bias")})

    assert torch.equal(out, torch.tensor([[3.0, -1.0]]).expand(5, 2))
    assert torch.equal(merged["lin.bias"], torch.tensor([3.0, -1.0]))
    assert torch.equal(restored["lin.bias"], torch.tensor([1.0, 1.0]))
    assert torch.equal(method.merge_map()(tree)["lin.bias"], torch.tensor([3.0, -1.0]))


def test_lora_bias_creates_bias_on_base_without_one():
    from ftpeft import functional_forward

    method = lora(["lin"], r=2, alpha=8.0, lora_bias=True)
    tree = {k: v for k, v in lora_bias_tree().items() if k != "lin.bias"}

    out = functional_forward(OneLinear(bias=False), method)(tree, torch.randn(3, 2))
    merged = method.merge(tree)

    assert torch.equal(out, torch.tensor([[2.0, -2.0]]).expand(3, 2))
    assert torch.equal(merged["lin.bias"], torch.tensor([2.0, -2.0]))
    assert torch.equal(method.merge_map()(tree)["lin.bias"], torch.tensor([2.0, -2.0]))


def test_lora_bias_is_injected_and_trainable():
    method = lora(["lin"], lora_bias=True)

    injected = method.inject({"lin.weight": torch.randn(3, 4)})

    assert torch.equal(injected["lin.lora_bias"], torch.zeros(3))
    assert "lin.lora_bias" in method.trainable_keys(injected)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_svd_and_qr_inits_keep_the_product(init):
    weight = torch.randn(6, 5)
    method = lora(["w"], r=3, alpha=6.0, init=init)

    tree = method.inject({"w.weight": weight})

    scale = 2.0
    lora_a, lora_b = tree["w.lora_A"], tree["w.lora_B"]
    assert lora_a.shape == (3, 5)
    assert lora_b.shape == (6, 3)
    torch.testing.assert_close(tree["w.weight"] + scale * lora_b @ lora_a, weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.merge(tree)["w.weight"], weight, rtol=1e-5, atol=1e-5)
    if init == "pissa":
        # s * B @ A is the best rank-3 approximation of W: its residual's norm is the tail singular values' norm.
        singular = torch.linalg.svdvals(weight)
        torch.testing.assert_close(torch.linalg.matrix_norm(tree["w.weight"]), singular[3:].norm(), rtol=1e-4, atol=1e-5)
    else:
        torch.testing.assert_close(lora_b.T @ lora_b, torch.eye(3), rtol=1e-5, atol=1e-5)


def test_svd_init_rejects_rank_above_matrix_rank():
    with pytest.raises(ValueError, match="r <= min"):
        lora(["w"], r=4, init="pissa").inject({"w.weight": torch.randn(3, 5)})


def test_svd_init_plans_on_specs():
    planned = lora(["w"], r=2, init="pissa").inject(spec_of({"w.weight": torch.empty(4, 4, device="meta")}))

    assert planned["w.lora_A"].shape == (2, 4)

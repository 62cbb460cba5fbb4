"""Tests of many adapters at once: stacked adapters under vmap, and mixed batches."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from ftpeft import LoRA, LoRAConfig, LoRAParameters, functional_forward, select, split_trainable
from ftpeft.multi import mixed_forward, stack_adapters, unstack_adapters

from conftest import randomise_lora_b, state_of


def linear_lora():
    return LoRA(LoRAConfig(module_name_pattern=["lin"], params=LoRAParameters(r=2, alpha=2.0)))


def linear_model(weight: torch.Tensor) -> nn.Module:
    model = nn.Sequential(OrderedDict(lin=nn.Linear(weight.shape[1], weight.shape[0], bias=False)))
    with torch.no_grad():
        model.lin.weight.copy_(weight)
    return model


def random_lora_adapter(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {"lin.lora_A": torch.randn(2, 4, generator=generator), "lin.lora_B": torch.randn(3, 2, generator=generator)}


# mixed_forward


def test_mixed_batch_rows_match_single_adapter_math():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=generator)
    adapters = {"a": random_lora_adapter(generator), "b": random_lora_adapter(generator)}
    X = torch.randn(3, 4, generator=generator)
    s = 2.0 / 2

    output = mixed_forward(linear_model(W), linear_lora())({"lin.weight": W}, adapters, ["a", None, "b"], X)

    A_a, B_a = adapters["a"]["lin.lora_A"], adapters["a"]["lin.lora_B"]
    A_b, B_b = adapters["b"]["lin.lora_A"], adapters["b"]["lin.lora_B"]
    torch.testing.assert_close(output[0], X[0] @ (W + s * B_a @ A_a).T)
    torch.testing.assert_close(output[1], X[1] @ W.T)
    torch.testing.assert_close(output[2], X[2] @ (W + s * B_b @ A_b).T)
    assert output.shape == (3, 3)


def test_mixed_batch_rejects_unknown_name():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=generator)
    adapters = {"a": random_lora_adapter(generator), "b": random_lora_adapter(generator)}
    fn = mixed_forward(linear_model(W), linear_lora())

    with pytest.raises(ValueError, match=r"names\[1\] is 'c', which is not an adapter name. Known adapters: 'a', 'b'"):
        fn({"lin.weight": W}, adapters, ["a", "c", None], torch.randn(3, 4))


def test_mixed_batch_rejects_names_length():
    generator = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=generator)
    fn = mixed_forward(linear_model(W), linear_lora())

    with pytest.raises(ValueError, match="names has 2 entries but the batch has 3 rows"):
        fn({"lin.weight": W}, {"a": random_lora_adapter(generator)}, ["a", None], torch.randn(3, 4))


def test_mixed_batch_rejects_no_tensor_argument():
    W = torch.randn(3, 4)
    fn = mixed_forward(linear_model(W), linear_lora())

    with pytest.raises(TypeError, match="at least one tensor argument"):
        fn({"lin.weight": W}, {}, [None], [1.0, 2.0])


def test_mixed_batch_all_base_equals_plain_forward(mlp):
    method = LoRA(LoRAConfig(module_name_pattern=["up", "down"], params=LoRAParameters(r=2)))
    x = torch.randn(4, 6)

    output = mixed_forward(mlp, method)(state_of(mlp), {}, [None] * 4, x)

    torch.testing.assert_close(output, mlp(x))


class Shifted(nn.Module):
    """A model with a per-sample keyword argument, a shared argument, and a dict output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, *, offset, shared):
        hidden = self.lin(x) + offset
        return {"hidden": hidden * shared, "pair": (hidden.sum(-1), None)}


def test_mixed_batch_splits_kwargs_and_keeps_shared():
    model = Shifted()
    method = LoRA(LoRAConfig(module_name_pattern=["lin"], params=LoRAParameters(r=2, alpha=4.0)))
    base = state_of(model)
    tree = randomise_lora_b(method.inject(base, generator=torch.Generator().manual_seed(0)))
    adapter = select(tree, method.adapter_keys(tree))
    x, offset = torch.randn(5, 4), torch.randn(5, 3)
    shared = torch.randn(3)  # dimension 0 is 3, not the batch size 5, so every sub-batch gets all of it
    names = ["a", None, "a", None, "a"]

    output = mixed_forward(model, method)(base, {"a": adapter}, names, x, offset=offset, shared=shared)

    single = functional_forward(model, method)
    plain = functional_forward(model)
    for row, name in enumerate(names):
        if name is None:
            expected = plain(base, x[row : row + 1], offset=offset[row : row + 1], shared=shared)
        else:
            expected = single((adapter, base), x[row : row + 1], offset=offset[row : row + 1], shared=shared)
        torch.testing.assert_close(output["hidden"][row], expected["hidden"][0])
        torch.testing.assert_close(output["pair"][0][row], expected["pair"][0][0])
    assert output["pair"][1] is None
    assert isinstance(output["pair"], tuple)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, scale):
        return self.lin(x) * scale


def test_mixed_batch_size_from_first_keyword():
    model = Scaled()
    method = LoRA(LoRAConfig(module_name_pattern=["lin"], params=LoRAParameters(r=2)))
    x, scale = torch.randn(5, 4), torch.randn(3)

    # "scale" sorts before "x", but x is given first, so the batch has 5 rows and scale is shared.
    output = mixed_forward(model, method)(state_of(model), {}, [None] * 5, x=x, scale=scale)

    torch.testing.assert_close(output, model(x, scale))


class ScalarOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).sum()


def test_mixed_batch_rejects_scalar_output():
    model = ScalarOutput()
    method = LoRA(LoRAConfig(module_name_pattern=["lin"], params=LoRAParameters(r=2)))

    with pytest.raises(TypeError, match="cannot split output into rows"):
        mixed_forward(model, method)(state_of(model), {}, [None, None], torch.randn(2, 4))


def test_mixed_batch_does_not_mutate_inputs(mlp):
    method = LoRA(LoRAConfig(module_name_pattern=["up"], params=LoRAParameters(r=2)))
    base = state_of(mlp)
    tree = randomise_lora_b(method.inject(base, generator=torch.Generator().manual_seed(0)))
    adapter = select(tree, method.adapter_keys(tree))
    copies = {key: leaf.clone() for key, leaf in {**base, **adapter}.items()}
    x = torch.randn(3, 6)
    x_copy = x.clone()

    mixed_forward(mlp, method)(base, {"a": adapter}, ["a", None, "a"], x)

    for key, leaf in {**base, **adapter}.items():
        assert torch.equal(leaf, copies[key]), key
    assert torch.equal(x, x_copy)


def test_mixed_batch_llama_two_adapters():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    method = LoRA(LoRAConfig(module_name_pattern=["q_proj", "v_proj"], params=LoRAParameters(r=4, alpha=8.0)))
    base = state_of(model)
    adapters = {}
    for name, seed in (("first", 1), ("second", 2)):
        tree = randomise_lora_b(method.inject(base, generator=torch.Generator().manual_seed(seed)), seed=seed)
        adapters[name] = select(tree, method.adapter_keys(tree))
    input_ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(3))
    names = ["second", "first", None, "second"]

    logits = mixed_forward(model, method)(base, adapters, names, input_ids=input_ids, use_cache=False).logits

    single = functional_forward(model, method)
    plain = functional_forward(model)
    for row, name in enumerate(names):
        ids = input_ids[row : row + 1]
        if name is None:
            expected = plain(base, input_ids=ids, use_cache=False).logits
        else:
            expected = single((adapters[name], base), input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(logits[row], expected[0], rtol=1e-5, atol=1e-5)
    # The two adapters really differ, so a row that used the wrong one would fail above.
    assert not torch.allclose(logits[0], single((adapters["first"], base), input_ids=input_ids[:1], use_cache=False).logits[0])


def test_mixed_batch_llama_cache_raises():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, vocab_size=64
    )
    model = transformers.LlamaForCausalLM(config).eval()
    method = LoRA(LoRAConfig(module_name_pattern=["q_proj"], params=LoRAParameters(r=2)))

    with pytest.raises(TypeError, match="use_cache=False"):
        mixed_forward(model, method)(state_of(model), {}, [None, None], input_ids=torch.zeros(2, 3, dtype=torch.long))


# stack_adapters


def test_stacked_adapters_under_vmap_match_single(mlp):
    method = LoRA(LoRAConfig(module_name_pattern=["up", "down"], params=LoRAParameters(r=2, alpha=4.0, use_rslora=True)))
    tree = method.inject(state_of(mlp), generator=torch.Generator().manual_seed(0))
    _, frozen = split_trainable(method, tree)
    adapters = []
    for seed in range(3):
        trainable, _ = split_trainable(method, randomise_lora_b(method.inject(frozen, generator=torch.Generator().manual_seed(seed)), seed=seed))
        adapters.append(trainable)
    fn = functional_forward(mlp, method)
    x = torch.randn(5, 6)

    stacked = stack_adapters(adapters)
    outputs = torch.func.vmap(lambda adapter: fn((adapter, frozen), x))(stacked)

    assert stacked["up.lora_A"].shape == (3, 2, 6)
    assert outputs.shape == (3, 5, 4)
    for index, adapter in enumerate(adapters):
        torch.testing.assert_close(outputs[index], fn((adapter, frozen), x))


def test_unstack_inverts_stack():
    generator = torch.Generator().manual_seed(0)
    adapters = [random_lora_adapter(generator) for _ in range(3)]

    restored = unstack_adapters(stack_adapters(adapters))

    assert len(restored) == 3
    for original, back in zip(adapters, restored):
        assert list(back) == list(original)
        for key in original:
            assert torch.equal(back[key], original[key])


def test_stack_rejects_different_keys():
    generator = torch.Generator().manual_seed(0)
    first, second = random_lora_adapter(generator), random_lora_adapter(generator)
    second["other.lora_A"] = second.pop("lin.lora_A")

    with pytest.raises(ValueError, match=r"Adapter 1 lacks key\(s\) \['lin.lora_A'\] and has extra key\(s\) \['other.lora_A'\]"):
        stack_adapters([first, second])


def test_stack_rejects_different_shapes():
    generator = torch.Generator().manual_seed(0)
    first, second = random_lora_adapter(generator), random_lora_adapter(generator)
    second["lin.lora_A"] = torch.randn(3, 4)

    with pytest.raises(ValueError, match=r"Adapter 1 has 'lin.lora_A' of shape \(3, 4\)"):
        stack_adapters([first, second])


def test_stack_rejects_empty_list():
    with pytest.raises(ValueError, match="at least one adapter"):
        stack_adapters([])


def test_unstack_rejects_ragged_leaves():
    with pytest.raises(ValueError, match="share a leading dimension"):
        unstack_adapters({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})

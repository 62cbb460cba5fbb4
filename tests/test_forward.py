"""Tests of functional_forward: unmerged math, materialised fallback, purity, transforms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ftpeft import (
    FullTuneConfig,
    LoRAConfig,
    LoRAParameters,
    PeftStackConfig,
    functional_forward,
    peft_method_from_config,
    split_trainable,
)

from conftest import TwoLayerMLP, randomise_lora_b, state_of


def lora(pattern, r=2, alpha=4.0, **params):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha, **params)))


def mlp_reference(tree, x, scale, targets=("up", "down")):
    """Compute the adapted MLP by hand: y = down(relu(up(x))) with W + s B A on each target."""

    def weight(name):
        w = tree[f"{name}.weight"]
        if name in targets:
            w = w + scale * tree[f"{name}.lora_B"] @ tree[f"{name}.lora_A"]
        return w

    hidden = torch.relu(x @ weight("up").T + tree["up.bias"])
    return hidden @ weight("down").T + tree["down.bias"]


def test_fresh_adapters_leave_output_unchanged(mlp):
    method = lora(["up", "down"])
    tree = method.inject(state_of(mlp))
    x = torch.randn(3, 6)

    torch.testing.assert_close(functional_forward(mlp, method)(tree, x), mlp(x), rtol=0, atol=0)


def test_unmerged_forward_matches_formula(mlp):
    method = lora(["up", "down"], r=3, alpha=6.0)
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    x = torch.randn(5, 6)

    out = functional_forward(mlp, method)(tree, x)

    torch.testing.assert_close(out, mlp_reference(tree, x, scale=2.0))


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(1, 12), alpha=st.floats(0.5, 32.0), use_rslora=st.booleans(), seed=st.integers(0, 1000))
def test_forward_equals_forward_of_merged_tree(rank, alpha, use_rslora, seed):
    torch.manual_seed(seed)
    model = TwoLayerMLP()
    method = lora(["up", "down"], r=rank, alpha=alpha, use_rslora=use_rslora)
    tree = randomise_lora_b(method.inject(state_of(model)), seed=seed)
    x = torch.randn(4, 6)

    adapted = functional_forward(model, method)(tree, x)
    merged = functional_forward(model)(method.merge(tree), x)

    torch.testing.assert_close(adapted, merged, rtol=1e-5, atol=1e-5)


class RecordShapes(TorchDispatchMode):
    """Record the name and output shape of every aten op that runs."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor):
            self.records.append((func.overloadpacket.__name__, tuple(out.shape)))
        return out


def test_linear_builds_no_dense_update():
    model = nn.Linear(5, 7)
    method = lora(r".*", r=2)
    tree = randomise_lora_b(method.inject(state_of(model)))
    x = torch.randn(3, 5)

    with RecordShapes() as recorder:
        functional_forward(model, method)(tree, x)

    dense = [name for name, shape in recorder.records if shape == (7, 5)]
    assert set(dense) <= {"view", "alias", "detach"}, dense


class StoredTransposed(nn.Module):
    """Keeps its weight as (in, out) and calls addmm, as transformers' Conv1D does."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 7))
        self.bias = nn.Parameter(torch.randn(7))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def test_transposed_weight_uses_addmm_without_dense_update():
    model = StoredTransposed()
    method = lora(r".*", r=2, alpha=2.0, fan_in_fan_out=True)
    tree = randomise_lora_b(method.inject(state_of(model)))
    x = torch.randn(3, 5)

    with RecordShapes() as recorder:
        out = functional_forward(model, method)(tree, x)

    dense = [name for name, shape in recorder.records if shape in {(5, 7), (7, 5)}]
    assert set(dense) <= {"view", "alias", "detach"}, dense
    expected = tree["bias"] + x @ tree["weight"] + (x @ tree["lora_A"].T) @ tree["lora_B"].T
    torch.testing.assert_close(out, expected)


class UsesWeightDirectly(nn.Module):
    """Reaches its weight through matmul, transpose and indexing instead of F.linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 6, bias=False)

    def forward(self, x, rows):
        by_matmul = torch.matmul(x, self.proj.weight.t())
        by_rows = self.proj.weight[rows]
        return by_matmul, by_rows


def test_other_ops_see_materialised_weight():
    model = UsesWeightDirectly()
    method = lora(["proj"], r=2, alpha=2.0)
    tree = randomise_lora_b(method.inject(state_of(model)))
    x, rows = torch.randn(3, 4), torch.tensor([0, 5, 2])
    weight = tree["proj.weight"] + tree["proj.lora_B"] @ tree["proj.lora_A"]

    by_matmul, by_rows = functional_forward(model, method)(tree, x, rows)

    torch.testing.assert_close(by_matmul, x @ weight.T)
    torch.testing.assert_close(by_rows, weight[rows])


def test_dropout_applies_to_adapter_input_in_training_only():
    model = nn.Linear(8, 3)
    method = lora(r".*", r=2, alpha=2.0, dropout=0.5)
    tree = randomise_lora_b(method.inject(state_of(model)))
    fn = functional_forward(model, method)
    x = torch.randn(16, 8)
    base = x @ tree["weight"].T + tree["bias"]

    model.eval()
    torch.testing.assert_close(fn(tree, x), base + (x @ tree["lora_A"].T) @ tree["lora_B"].T)

    model.train()
    torch.manual_seed(3)
    out = fn(tree, x)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.5, training=True)
    torch.testing.assert_close(out, base + (dropped @ tree["lora_A"].T) @ tree["lora_B"].T)
    assert not torch.allclose(out, fn(tree, x))


class TiedModel(nn.Module):
    """An embedding and an output head that share one weight."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


@pytest.mark.parametrize("target", ["head", "embed"])
def test_tied_weight_carries_adapter_only_into_target(target):
    model = TiedModel()
    embedding_pattern = ["embed"] if target == "embed" else None
    method = peft_method_from_config(LoRAConfig(module_name_pattern=[target], embedding_pattern=embedding_pattern, params=LoRAParameters(r=2, alpha=2.0)))
    generator = torch.Generator().manual_seed(1)
    tree = {k: (torch.randn(v.shape, generator=generator) if "lora" in k else v) for k, v in method.inject(state_of(model)).items()}
    ids = torch.tensor([1, 4, 6])
    base = tree["embed.weight"]
    if target == "head":
        adapted = base + tree["head.lora_B"] @ tree["head.lora_A"]
    else:
        # The embedding layout: A is (r, vocab), B is (dim, r), and the table gains (B A)^T.
        adapted = base + (tree["embed.lora_embedding_B"] @ tree["embed.lora_embedding_A"]).T
    embed_weight, head_weight = (base, adapted) if target == "head" else (adapted, base)

    out = functional_forward(model, method)(tree, ids)

    torch.testing.assert_close(out, embed_weight[ids] @ head_weight.T)


def test_tied_weight_given_under_one_name():
    model = TiedModel()
    method = lora(["head"], r=2, alpha=2.0)
    tree = randomise_lora_b(method.inject(state_of(model)))
    del tree["embed.weight"]
    ids = torch.tensor([0, 2])
    adapted = tree["head.weight"] + tree["head.lora_B"] @ tree["head.lora_A"]

    out = functional_forward(model, method)(tree, ids)

    torch.testing.assert_close(out, tree["head.weight"][ids] @ adapted.T)


def test_forward_leaves_module_and_tree_untouched(mlp):
    method = lora(["up", "down"], dropout=0.1)
    mlp.train()
    before_module = {k: (v, v._version, v.data_ptr(), v.requires_grad, v.clone()) for k, v in mlp.state_dict(keep_vars=True).items()}
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    trainable, frozen = split_trainable(method, tree)
    trainable = {k: v.requires_grad_() for k, v in trainable.items()}
    before_tree = {k: (v._version, v.data_ptr(), v.requires_grad) for k, v in {**trainable, **frozen}.items()}

    out = functional_forward(mlp, method)((trainable, frozen), torch.randn(2, 6))
    out.sum().backward()

    assert all(module.training for module in mlp.modules())
    for key, (value, version, pointer, requires_grad, copy) in before_module.items():
        now = mlp.state_dict(keep_vars=True)[key]
        assert now is value
        assert now._version == version
        assert now.data_ptr() == pointer
        assert now.requires_grad == requires_grad
        assert torch.equal(now, copy)
        assert now.grad is None
    for key, (version, pointer, requires_grad) in before_tree.items():
        value = {**trainable, **frozen}[key]
        assert (value._version, value.data_ptr(), value.requires_grad) == (version, pointer, requires_grad)


def test_tree_given_as_list_of_disjoint_parts(mlp):
    method = lora(["up"])
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(mlp, method)
    x = torch.randn(2, 6)

    torch.testing.assert_close(fn([trainable, frozen], x), fn(tree, x))
    with pytest.raises(ValueError, match="up.lora_A"):
        fn((trainable, trainable, frozen), x)


def test_unknown_key_is_named(mlp):
    tree = {**state_of(mlp), "model.up.weight": torch.zeros(10, 6)}

    with pytest.raises(ValueError, match="'model.up.weight'"):
        functional_forward(mlp)(tree, torch.randn(1, 6))


def test_missing_parameter_is_named(mlp):
    tree = state_of(mlp)
    del tree["down.bias"]

    with pytest.raises(ValueError, match="'down.bias'"):
        functional_forward(mlp)(tree, torch.randn(1, 6))


def test_grad_matches_hand_written_gradient(mlp):
    method = lora(["up", "down"], r=2, alpha=4.0)
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(mlp, method)
    x = torch.randn(4, 6)

    grads = torch.func.grad(lambda t: fn((t, frozen), x).square().sum())(trainable)
    leaves = {k: v.clone().requires_grad_() for k, v in trainable.items()}
    mlp_reference({**frozen, **leaves}, x, scale=2.0).square().sum().backward()

    assert set(grads) == set(trainable)
    for key in trainable:
        torch.testing.assert_close(grads[key], leaves[key].grad)


def test_per_sample_gradients_with_vmap(mlp):
    method = lora(["up", "down"])
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(mlp, method)
    xs = torch.randn(5, 6)

    def loss(trainable, x):
        return fn((trainable, frozen), x[None]).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(trainable, xs)

    for i in range(len(xs)):
        single = torch.func.grad(loss)(trainable, xs[i])
        for key in trainable:
            torch.testing.assert_close(per_sample[key][i], single[key])


def test_batch_of_stacked_adapters_with_vmap(mlp):
    method = lora(["up"], r=2, alpha=2.0)
    frozen = state_of(mlp)
    generator = torch.Generator().manual_seed(0)
    stacked = {"up.lora_A": torch.randn(3, 2, 6, generator=generator), "up.lora_B": torch.randn(3, 10, 2, generator=generator)}
    fn = functional_forward(mlp, method)
    x = torch.randn(4, 6)

    outs = torch.func.vmap(lambda adapter: fn((adapter, frozen), x))(stacked)

    for i in range(3):
        tree = {**frozen, "up.lora_A": stacked["up.lora_A"][i], "up.lora_B": stacked["up.lora_B"][i]}
        torch.testing.assert_close(outs[i], mlp_reference(tree, x, scale=1.0, targets=("up",)))


def test_stack_forward_uses_lora_and_trains_full_tune_leaves(mlp):
    config = PeftStackConfig(methods=[LoRAConfig(module_name_pattern=["up"], params=LoRAParameters(r=2, alpha=4.0)), FullTuneConfig(module_name_pattern="down")])
    method = peft_method_from_config(config)
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    trainable, frozen = split_trainable(method, tree)
    x = torch.randn(3, 6)

    out = functional_forward(mlp, method)((trainable, frozen), x)

    assert set(trainable) == {"up.lora_A", "up.lora_B", "down.weight", "down.bias"}
    torch.testing.assert_close(out, mlp_reference(tree, x, scale=2.0, targets=("up",)))
    torch.testing.assert_close(functional_forward(mlp)(method.merge(tree), x), out)


@pytest.mark.slow
def test_compile_fullgraph_on_mlp(mlp):
    torch._dynamo.reset()
    method = lora(["up", "down"])
    tree = randomise_lora_b(method.inject(state_of(mlp)))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(mlp, method)
    x = torch.randn(4, 6)

    def loss(trainable, frozen, x):
        return fn((trainable, frozen), x).square().mean()

    eager_out, eager_grads = fn(tree, x), torch.func.grad(loss)(trainable, frozen, x)
    compiled_out = torch.compile(fn, fullgraph=True)(tree, x)
    compiled_grads = torch.compile(torch.func.grad(loss), fullgraph=True)(trainable, frozen, x)

    torch.testing.assert_close(compiled_out, eager_out)
    for key in trainable:
        torch.testing.assert_close(compiled_grads[key], eager_grads[key])


def test_buffers_updated_in_place_stay_untouched():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).train()
    method = lora(["0"])
    tree = method.inject(state_of(model))
    module_stats = model[1].running_mean.clone()
    tree_stats = tree["1.running_mean"].clone()

    functional_forward(model, method)(tree, torch.randn(8, 3))
    functional_forward(model)({k: v for k, v in state_of(model).items() if k != "1.running_mean"}, torch.randn(8, 3))

    assert torch.equal(model[1].running_mean, module_stats)
    assert torch.equal(tree["1.running_mean"], tree_stats)


def test_conv1d_without_fan_in_fan_out_is_rejected():
    transformers = pytest.importorskip("transformers")
    model = transformers.pytorch_utils.Conv1D(6, 4)

    with pytest.raises(ValueError, match="Conv1D.*fan_in_fan_out=True"):
        functional_forward(model, lora(r".*"))
    with pytest.raises(ValueError, match="nn.Linear.*fan_in_fan_out=False"):
        functional_forward(nn.Linear(4, 6), lora(r".*", fan_in_fan_out=True))


def test_meta_buffer_without_value_is_named():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=20)
    real = transformers.BertModel(config).eval()
    with torch.device("meta"):
        meta = transformers.BertModel(config).eval()
    ids = torch.tensor([[1, 2, 3]])

    with pytest.raises(ValueError, match="'embeddings.position_ids'.*parameters_on_meta"):
        functional_forward(meta)(state_of(real), input_ids=ids)

    from ftpeft import parameters_on_meta

    with parameters_on_meta():
        planned = transformers.BertModel(config).eval()
    out = functional_forward(planned)(state_of(real), input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, real(input_ids=ids).last_hidden_state)


@pytest.mark.slow
def test_compiled_lora_scale_matches_eager():
    # Guards against a compiler rewrite that drops the LoRA scale (torch 2.13
    # miscompiles add(mm, alpha=k), so the adapter must not be written that way).
    torch._dynamo.reset()
    model = nn.Linear(6, 5)
    method = lora(r".*", r=2, alpha=6.0)
    tree = randomise_lora_b(method.inject(state_of(model)))
    fn = functional_forward(model, method)
    x = torch.randn(4, 6)

    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(tree, x), fn(tree, x))


class TransposedUses(nn.Module):
    """A linear weight used through its transpose, as hand-written layers do."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 4)

    def forward(self, x):
        weight = self.proj.weight
        return x @ weight.t() + torch.matmul(x, weight.T) + F.linear(x, weight.t().t()) + self.proj.bias


@pytest.mark.parametrize("use_dora", [False, True])
def test_transposed_weight_carries_adapter(use_dora):
    model = TransposedUses()
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["proj"], params=LoRAParameters(r=2, alpha=4.0, use_dora=use_dora)))
    generator = torch.Generator().manual_seed(5)
    tree = method.inject(state_of(model))
    tree = {k: (torch.randn(v.shape, generator=generator) if k.endswith(("lora_A", "lora_B")) else v) for k, v in tree.items()}
    x = torch.randn(3, 6)

    out = functional_forward(model, method)(tree, x)

    adapted = tree["proj.weight"] + 2.0 * tree["proj.lora_B"] @ tree["proj.lora_A"]
    if use_dora:
        adapted = tree["proj.lora_magnitude_vector"][:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, 3 * (x @ adapted.T) + tree["proj.bias"], rtol=1e-5, atol=1e-5)


def test_transposed_weight_builds_no_dense_update():
    model = TransposedUses()
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["proj"], params=LoRAParameters(r=2, alpha=4.0)))
    tree = method.inject(state_of(model))
    x = torch.randn(3, 6)
    weight_sized = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and tuple(result.shape) in ((4, 6), (6, 4)):
                weight_sized.append(getattr(func, "__name__", str(func)))
            return result

    with Recorder():
        functional_forward(model, method)(tree, x)

    # Only the views of the weight have its size: no W + s B A is built.
    assert sorted(weight_sized) == ["__get__", "t", "t", "t", "view"]

"""LoRA on nn.Embedding tables: layout, forward, merge, padding and max_norm, and PEFT's format."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, spec_of
from ftpeft.io import FtpeftWarning, load_hf_peft_adapter, save_hf_peft_adapter

from conftest import result_shapes


class Tokens(nn.Module):
    """An embedding table followed by a linear head."""

    def __init__(self, vocab=6, dim=4, padding_idx=None, max_norm=None):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=padding_idx, max_norm=max_norm)
        self.head = nn.Linear(dim, 3)

    def forward(self, ids):
        return self.head(self.embed(ids))


def embedding_lora(r=2, alpha=4.0, **params):
    config = LoRAConfig(module_name_pattern=["embed"], embedding_pattern=["embed"], params=LoRAParameters(r=r, alpha=alpha, **params))
    return peft_method_from_config(config)


def test_embedding_case_merges_and_unmerges():
    # E = randn(6, 4) (seed 0), A randn(2, 6), B randn(4, 2), r = 2, alpha = 4, ids [0, 3, 5, 3].
    torch.manual_seed(0)
    table = torch.randn(6, 4)
    lora_a, lora_b = torch.randn(2, 6), torch.randn(4, 2)
    model = nn.Embedding(6, 4)
    method = peft_method_from_config(LoRAConfig(module_name_pattern=".*", embedding_pattern=".*", params=LoRAParameters(r=2, alpha=4)))
    tree = {"weight": table, "lora_embedding_A": lora_a, "lora_embedding_B": lora_b}
    ids = torch.tensor([0, 3, 5, 3])

    out = functional_forward(model, method)(tree, ids)
    merged = method.merge(tree)
    restored = method.unmerge(merged, {"lora_embedding_A": lora_a, "lora_embedding_B": lora_b})

    expected_table = table + 2.0 * (lora_b @ lora_a).T
    torch.testing.assert_close(out, expected_table[ids], atol=1e-6, rtol=0)
    assert set(merged) == {"weight"}
    assert merged["weight"].shape == (6, 4)
    torch.testing.assert_close(merged["weight"][ids], out, atol=1e-6, rtol=0)
    torch.testing.assert_close(restored["weight"], table, atol=1e-6, rtol=0)


def test_embedding_layout_and_init():
    method = embedding_lora(r=3)

    tree = method.inject(dict(Tokens().state_dict()), generator=torch.Generator().manual_seed(0))

    assert tree["embed.lora_embedding_A"].shape == (3, 6)
    assert tree["embed.lora_embedding_B"].shape == (4, 3)
    # A starts at zero and B normal, the reverse of the linear layout, so a fresh adapter changes nothing.
    assert torch.count_nonzero(tree["embed.lora_embedding_A"]) == 0
    assert torch.count_nonzero(tree["embed.lora_embedding_B"]) == 12
    assert "embed.lora_A" not in tree


def test_embedding_gaussian_init_is_reversed():
    tree = embedding_lora(r=2, init="gaussian").inject(dict(Tokens().state_dict()), generator=torch.Generator().manual_seed(0))

    assert torch.count_nonzero(tree["embed.lora_embedding_A"]) == 12
    assert torch.count_nonzero(tree["embed.lora_embedding_B"]) == 0


def random_leaves(tree, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) if "lora" in k else v) for k, v in tree.items()}


def test_embedding_forward_builds_no_dense_table():
    model = Tokens(vocab=50)
    method = embedding_lora()
    tree = random_leaves(method.inject(dict(model.state_dict())))
    ids = torch.tensor([[1, 7, 49]])

    shapes = result_shapes(lambda: functional_forward(model, method)(tree, ids))

    assert (50, 4) not in shapes
    assert (4, 50) not in shapes


def test_padding_row_gets_no_gradient():
    model = Tokens(padding_idx=1)
    method = embedding_lora()
    tree = random_leaves(method.inject(dict(model.state_dict())))
    adapter = {k: v for k, v in tree.items() if "lora" in k}
    frozen = {k: v for k, v in tree.items() if "lora" not in k}
    ids = torch.tensor([[1, 3, 1, 5]])
    fn = functional_forward(model, method)

    def adapted(adapter):
        return fn({**frozen, **adapter}, ids).square().sum()

    def materialised(adapter):
        table = frozen["embed.weight"] + 2.0 * (adapter["embed.lora_embedding_B"] @ adapter["embed.lora_embedding_A"]).T
        hidden = F.embedding(ids, table, padding_idx=1)
        return F.linear(hidden, frozen["head.weight"], frozen["head.bias"]).square().sum()

    grads = torch.func.grad(adapted)(adapter)
    expected = torch.func.grad(materialised)(adapter)

    torch.testing.assert_close(grads["embed.lora_embedding_A"], expected["embed.lora_embedding_A"])
    torch.testing.assert_close(grads["embed.lora_embedding_B"], expected["embed.lora_embedding_B"])
    assert torch.count_nonzero(grads["embed.lora_embedding_A"][:, 1]) == 0


def test_max_norm_uses_adapted_table_without_touching_base():
    model = Tokens(max_norm=1.0)
    method = embedding_lora()
    tree = random_leaves(method.inject({k: v.clone() for k, v in model.state_dict().items()}))
    before = tree["embed.weight"].clone()
    ids = torch.tensor([[0, 2, 2, 5]])

    out = functional_forward(model, method)(tree, ids)

    table = before + 2.0 * (tree["embed.lora_embedding_B"] @ tree["embed.lora_embedding_A"]).T
    rows = F.embedding(ids, table.clone(), max_norm=1.0)
    torch.testing.assert_close(out, F.linear(rows, tree["head.weight"], tree["head.bias"]))
    assert torch.equal(tree["embed.weight"], before)


def test_embedding_without_pattern_is_rejected():
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["embed"]))

    with pytest.raises(ValueError, match=r"'embed' is an nn.Embedding.*embedding_pattern"):
        functional_forward(Tokens(), method)


def test_embedding_pattern_on_linear_is_rejected():
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["head"], embedding_pattern=["head"]))

    with pytest.raises(ValueError, match=r"'head'.*Linear, not an nn.Embedding"):
        functional_forward(Tokens(), method)


def test_embedding_rejects_lora_bias():
    with pytest.raises(ValueError, match=r"'embed'.*lora_bias"):
        embedding_lora(lora_bias=True).inject(spec_of(Tokens()))


def test_embedding_matches_peft_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    model = Tokens(padding_idx=0)
    reference = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "head"], init_lora_weights=False)
    )
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[0, 3, 5, 3]])

    config, adapter = load_hf_peft_adapter(tmp_path / "peft", base=spec_of(model))
    out = functional_forward(model, peft_method_from_config(config))({**model.state_dict(), **adapter}, ids)
    save_hf_peft_adapter(tmp_path / "ours", config, adapter)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")

    assert sorted(adapter) == ["embed.lora_embedding_A", "embed.lora_embedding_B", "head.lora_A", "head.lora_B"]
    assert config.embedding_pattern == ["embed"]
    torch.testing.assert_close(out, reference(ids), atol=1e-6, rtol=0)
    torch.testing.assert_close(reloaded(ids), reference(ids), atol=0, rtol=0)


def test_embedding_ignores_dropout():
    model = Tokens()
    method = embedding_lora(dropout=0.5)
    tree = random_leaves(method.inject(dict(model.state_dict())))
    ids = torch.tensor([[0, 3, 5, 3]])
    fn = functional_forward(model, method)

    model.eval()
    evaluated = fn(tree, ids)
    model.train()
    trained = fn(tree, ids)

    torch.testing.assert_close(trained, evaluated, atol=0, rtol=0)


def test_merge_warns_when_tied_weights_diverge():
    model = nn.Embedding(5, 3)
    tree = {"embed.weight": model.weight.detach(), "head.weight": model.weight.detach()}
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["embed"], embedding_pattern=["embed"], params=LoRAParameters(r=2)))

    with pytest.warns(FtpeftWarning, match=r"'embed.weight'.*'head.weight' \(tied weights\)"):
        method.merge(method.inject(tree))

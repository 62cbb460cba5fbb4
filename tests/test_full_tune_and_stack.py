"""Tests of FullTune and PeftStack as pure tree transforms."""

from __future__ import annotations

import pytest
import torch

from ftpeft import (
    FullTuneConfig,
    LoRAConfig,
    LoRAParameters,
    PeftStackConfig,
    peft_method_from_config,
    split_trainable,
)


def tree():
    return {
        "embed.weight": torch.randn(5, 4),
        "layers.0.norm.weight": torch.ones(4),
        "layers.0.attn.q.weight": torch.randn(4, 4),
        "layers.0.attn.q.bias": torch.randn(4),
        "layers.1.attn.q.weight": torch.randn(4, 4),
        "layers.1.step": torch.tensor(3),
    }


def full_tune(pattern):
    return peft_method_from_config(FullTuneConfig(module_name_pattern=pattern))


def test_full_tune_trains_matched_modules_recursively():
    method = full_tune(r"layers\.0")

    trainable, frozen = split_trainable(method, method.inject(tree()))

    assert set(trainable) == {"layers.0.norm.weight", "layers.0.attn.q.weight", "layers.0.attn.q.bias"}
    assert "embed.weight" in frozen


def test_full_tune_root_pattern_trains_floating_leaves_only():
    method = full_tune(".*")

    trainable = method.trainable_keys(tree())

    assert "layers.1.step" not in trainable
    assert len(trainable) == 5


def test_full_tune_list_entry_matches_suffix():
    assert full_tune(["norm"]).trainable_keys(tree()) == {"layers.0.norm.weight"}


def test_full_tune_pattern_that_matches_nothing_is_named():
    with pytest.raises(ValueError, match="'layer_norm'"):
        full_tune(["layer_norm"]).inject(tree())


def test_full_tune_merge_and_unmerge_keep_leaves():
    method = full_tune(["norm"])
    base = tree()

    merged = method.merge(base)

    assert merged == base
    assert merged is not base
    assert method.unmerge(merged, {}) == base
    with pytest.raises(ValueError, match="no adapter leaves"):
        method.unmerge(merged, {"x": torch.zeros(1)})


def stack():
    return peft_method_from_config(
        PeftStackConfig(
            methods=[
                LoRAConfig(module_name_pattern=["q"], params=LoRAParameters(r=2, alpha=2.0)),
                FullTuneConfig(module_name_pattern=["norm"]),
            ]
        )
    )


def test_stack_injects_every_member():
    method = stack()

    injected = method.inject(tree(), generator=torch.Generator().manual_seed(0))

    assert method.trainable_keys(injected) == {
        "layers.0.attn.q.lora_A",
        "layers.0.attn.q.lora_B",
        "layers.1.attn.q.lora_A",
        "layers.1.attn.q.lora_B",
        "layers.0.norm.weight",
    }


def test_stack_merge_then_unmerge_round_trips():
    method = stack()
    base = tree()
    injected = method.inject(base)
    injected = {k: (torch.randn(v.shape) if k.endswith("lora_B") else v) for k, v in injected.items()}
    adapter = {k: v for k, v in injected.items() if "lora_" in k}

    merged = method.merge(injected)
    restored = method.unmerge(merged, adapter)

    assert set(merged) == set(base)
    expected = base["layers.0.attn.q.weight"] + injected["layers.0.attn.q.lora_B"] @ injected["layers.0.attn.q.lora_A"]
    torch.testing.assert_close(merged["layers.0.attn.q.weight"], expected)
    assert set(restored) == set(injected)
    for key in injected:
        torch.testing.assert_close(restored[key], injected[key])


def test_stack_members_creating_same_keys_are_rejected():
    method = peft_method_from_config(
        PeftStackConfig(methods=[LoRAConfig(module_name_pattern=["q"]), LoRAConfig(module_name_pattern=r".*\.q")])
    )

    with pytest.raises(ValueError, match="Stack member 1 .*layers.0.attn.q.lora_A"):
        method.inject(tree())


def test_stack_member_that_matches_nothing_is_named():
    method = peft_method_from_config(
        PeftStackConfig(methods=[LoRAConfig(module_name_pattern=["q"]), FullTuneConfig(module_name_pattern=["missing_norm"])])
    )

    with pytest.raises(ValueError, match="FullTune pattern 'missing_norm'"):
        method.inject(tree())


def test_stack_unmerge_rejects_foreign_keys():
    method = stack()
    merged = tree()

    with pytest.raises(ValueError, match="no stack member creates"):
        method.unmerge(merged, {"embed.lora_A": torch.zeros(1)})

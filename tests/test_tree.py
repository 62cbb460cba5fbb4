"""Tests of ftpeft.tree: specs, splitting and combining."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ftpeft import TensorSpec, combine, select, spec_of, split
from ftpeft.tree import is_spec, module_paths


def test_spec_of_meta_module():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))

    spec = spec_of(model)

    assert list(spec) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert spec["0.weight"] == TensorSpec((3, 4), torch.float32, torch.device("meta"))
    assert spec["1.bias"].shape == (3,)


def test_spec_of_lists_tied_weights_under_each_name():
    model = nn.ModuleDict({"embed": nn.Embedding(5, 4), "head": nn.Linear(4, 5, bias=False)})
    model["head"].weight = model["embed"].weight

    spec = spec_of(model)

    assert set(spec) == {"embed.weight", "head.weight"}


def test_spec_of_tree_keeps_order_and_reads_no_data():
    tree = {"z.weight": torch.empty(2, 3, dtype=torch.bfloat16, device="meta"), "a.bias": torch.zeros(2)}

    spec = spec_of(tree)

    assert list(spec) == ["z.weight", "a.bias"]
    assert spec["z.weight"].dtype == torch.bfloat16
    assert spec["z.weight"].device.type == "meta"


def test_spec_of_rejects_other_types():
    with pytest.raises(TypeError, match="nn.Module or a mapping"):
        spec_of([torch.zeros(1)])


def test_is_spec_rejects_mixed_trees():
    with pytest.raises(TypeError, match="mixes TensorSpec"):
        is_spec({"a": torch.zeros(1), "b": TensorSpec((1,), torch.float32)})


def test_module_paths_include_containers_and_root():
    assert module_paths(["a.b.weight", "c"]) == ["", "a", "a.b"]


def test_split_and_combine_round_trip():
    tree = {"a": torch.zeros(1), "b": torch.ones(1), "c": torch.ones(2)}

    chosen, rest = split(tree, {"b"})

    assert list(chosen) == ["b"]
    assert list(rest) == ["a", "c"]
    assert chosen["b"] is tree["b"]
    assert combine(chosen, rest).keys() == tree.keys()


def test_split_names_missing_keys():
    with pytest.raises(KeyError, match="'nope'"):
        split({"a": torch.zeros(1)}, {"nope"})
    with pytest.raises(KeyError, match="'nope'"):
        select({"a": torch.zeros(1)}, {"nope"})


def test_combine_names_overlapping_keys():
    with pytest.raises(ValueError, match="'shared'"):
        combine({"shared": torch.zeros(1), "a": torch.zeros(1)}, {"shared": torch.ones(1)})


def test_combine_does_not_mutate_inputs():
    first, second = {"a": torch.zeros(1)}, {"b": torch.ones(1)}

    combined = combine(first, second)
    combined["c"] = torch.ones(1)

    assert list(first) == ["a"]
    assert list(second) == ["b"]

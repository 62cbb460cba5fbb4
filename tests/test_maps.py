"""Tests of ftpeft.maps: the algebra's laws, every leaf map, validation and merge maps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ftpeft import LoRAConfig, LoRAParameters, TensorSpec, peft_method_from_config
from ftpeft.maps import (
    AddPrefix,
    Cast,
    Chunk,
    Concatenate,
    Drop,
    Reshape,
    SelectScope,
    Shard,
    Squeeze,
    Stack,
    StateMap,
    StripPrefix,
    Transpose,
    Unsqueeze,
    Unstack,
    check_invertible,
    identity,
    regex_rename,
    rename,
)

segments = st.from_regex(r"[a-z]{1,4}", fullmatch=True)


@st.composite
def matrix_trees(draw, prefix=""):
    """Trees of 2-D float32 tensors under distinct dotted keys."""
    names = draw(st.lists(st.lists(segments, min_size=1, max_size=3).map(".".join), min_size=1, max_size=5, unique=True))
    # A key may not also be a module of another key, as in a state_dict.
    names = [n for n in names if not any(other.startswith(n + ".") for other in names)]
    tree = {}
    for name in names:
        rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        seed = draw(st.integers(0, 1000))
        tree[f"{prefix}{name}.w"] = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return tree


# Maps that accept every tree of 2-D tensors and produce another such tree.
map_pool = st.sampled_from(
    [
        Transpose(pattern=r".*"),
        AddPrefix("model"),
        AddPrefix("_orig_mod"),
        regex_rename(r"(.*)\.w", r"\1.weight"),
        regex_rename(r"(.*)", r"scope.\1"),
        identity,
    ]
)


def assert_trees_equal(first, second):
    assert list(first) == list(second)
    for key in first:
        assert first[key].dtype == second[key].dtype
        assert torch.equal(first[key], second[key]), key


def run(state_map, tree):
    # Some pool maps read only the keys they match, so pass the rest through.
    return state_map(tree, passthrough=True)


@settings(max_examples=50, deadline=None)
@given(tree=matrix_trees(), f=map_pool)
def test_inverse_undoes_map(tree, f):
    assert_trees_equal(run(f.inverse(), run(f, tree)), tree)
    check_invertible(f, tree, passthrough=True)


@settings(max_examples=50, deadline=None)
@given(tree=matrix_trees(), f=map_pool, g=map_pool, h=map_pool)
def test_composition_is_associative(tree, f, g, h):
    left, right = (f >> g) >> h, f >> (g >> h)

    assert left == right
    assert_trees_equal(run(left, tree), run(right, tree))
    assert_trees_equal(run(left, tree), run(h, run(g, run(f, tree))))


@settings(max_examples=30, deadline=None)
@given(tree=matrix_trees(), f=map_pool)
def test_identity_is_neutral(tree, f):
    assert identity >> f == f
    assert f >> identity == f
    assert_trees_equal(run(identity >> f, tree), run(f, tree))


@settings(max_examples=30, deadline=None)
@given(tree=matrix_trees(), f=map_pool, g=map_pool)
def test_inverse_laws(tree, f, g):
    assert f.inverse().inverse() == f
    assert (f >> g).inverse() == g.inverse() >> f.inverse()
    assert_trees_equal(run((f >> g).inverse(), run(f >> g, tree)), tree)


@settings(max_examples=30, deadline=None)
@given(left=matrix_trees(prefix="a."), right=matrix_trees(prefix="b."))
def test_parallel_inverse_is_parallel_of_inverses(left, right):
    f = Transpose(pattern=r"a\..*")
    g = regex_rename(r"b\.(.*)", r"bb.\1")
    tree = {**left, **right}

    both = f | g

    assert both.inverse() == f.inverse() | g.inverse()
    out = both(tree)
    assert_trees_equal({k: v for k, v in out.items() if k.startswith("a.")}, f(left))
    assert_trees_equal({k: v for k, v in out.items() if k.startswith("bb.")}, g(right))
    assert_trees_equal(both.inverse()(out), tree)


@pytest.mark.parametrize(
    "leaf_map",
    [
        Transpose(("w",)),
        Reshape(("w",), from_shape=(6, 4), to_shape=(3, 8)),
        Unsqueeze(("w",), dim=1),
        rename("w", "weight"),
        Cast(("w",), dtype=torch.float64, from_dtype=torch.float32),
        AddPrefix("base"),
    ],
)
def test_leaf_maps_round_trip_bit_exact(leaf_map):
    tree = {"w": torch.randn(6, 4), "b": torch.randn(6)}

    check_invertible(leaf_map, tree, passthrough=True)
    assert leaf_map.inverse().inverse() == leaf_map


def test_squeeze_round_trip_and_error():
    tree = {"w": torch.randn(1, 4)}

    check_invertible(Squeeze(("w",), dim=0), tree)
    with pytest.raises(ValueError, match="'w'.*size 1 at dimension 1"):
        Squeeze(("w",), dim=1)(tree)


def test_qkv_round_trip_through_concatenate_and_chunk():
    tree = {"attn.q.weight": torch.randn(8, 4), "attn.k.weight": torch.randn(2, 4), "attn.v.weight": torch.randn(2, 4)}
    fuse = Concatenate(("attn.q.weight", "attn.k.weight", "attn.v.weight"), "attn.qkv.weight", sizes=(8, 2, 2))

    fused = fuse(tree)

    assert list(fused) == ["attn.qkv.weight"]
    assert torch.equal(fused["attn.qkv.weight"], torch.cat(list(tree.values())))
    assert_trees_equal(fuse.inverse()(fused), tree)
    assert fuse.inverse() == Chunk("attn.qkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight"), sizes=(8, 2, 2))


def test_concatenate_checks_sizes():
    tree = {"q": torch.randn(8, 4), "k": torch.randn(2, 4)}

    with pytest.raises(ValueError, match="'k' to have size 4"):
        Concatenate(("q", "k"), "qk", sizes=(8, 4))(tree)
    with pytest.raises(ValueError, match="sizes \\(3, 3\\)"):
        Chunk("q", ("a", "b"), sizes=(3, 3))(tree, passthrough=True)


def test_stack_and_unstack_are_inverse():
    tree = {f"experts.{i}.w": torch.randn(3, 2) for i in range(4)}
    stack = Stack(tuple(tree), "experts.w")

    stacked = stack(tree)

    assert stacked["experts.w"].shape == (4, 3, 2)
    assert_trees_equal(stack.inverse()(stacked), tree)
    with pytest.raises(ValueError, match="needs size 3 at dimension 0"):
        Unstack("experts.w", ("a", "b", "c"))(stacked)


def test_strip_prefix_only_whole_segments():
    tree = {"_orig_mod.lin.weight": torch.zeros(1), "my_orig_mod.lin.weight": torch.ones(1)}

    out = StripPrefix("_orig_mod.")(tree, passthrough=True)

    assert list(out) == ["lin.weight", "my_orig_mod.lin.weight"]


def test_select_scope_keeps_one_child_and_adds_it_back():
    tree = {"encoder.layer.w": torch.zeros(2), "decoder.layer.w": torch.ones(2)}

    selected = SelectScope("encoder")(tree)

    assert list(selected) == ["layer.w"]
    assert list(SelectScope("encoder").inverse()(selected)) == ["encoder.layer.w"]
    assert SelectScope("encoder").inverse().inverse() == SelectScope("encoder")


def test_narrowing_cast_has_no_inverse():
    narrowing = Cast(("w",), dtype=torch.bfloat16, from_dtype=torch.float32)

    with pytest.raises(ValueError, match="narrows"):
        narrowing.inverse()
    with pytest.raises(ValueError, match="from_dtype"):
        Cast(("w",), dtype=torch.float64).inverse()


def test_widening_cast_round_trips_exactly():
    widening = Cast(("w",), dtype=torch.float32, from_dtype=torch.bfloat16)
    tree = {"w": torch.randn(5, 5).to(torch.bfloat16)}

    check_invertible(widening, tree)
    assert widening.exact


def test_regex_rename_rejects_collisions():
    tree = {"a.1.w": torch.zeros(1), "b.1.w": torch.zeros(1)}

    with pytest.raises(ValueError, match="not one to one"):
        regex_rename(r"[ab]\.(\d)\.w", r"x.\1.w")(tree)


def test_regex_rename_without_derivable_inverse_says_how():
    f = regex_rename(r"layers\.\d+\.(.*)", r"\1")

    with pytest.raises(ValueError, match="inverse="):
        f.inverse()


def test_regex_rename_checks_explicit_inverse():
    tree = {"layers.3.w": torch.zeros(1)}
    wrong = regex_rename(r"layers\.(\d+)\.w", r"l\1", inverse=(r"l(\d+)", r"layers.\1.weight"))

    with pytest.raises(ValueError, match="not invertible on 'layers.3.w'"):
        wrong(tree)


def test_missing_input_key_is_named():
    with pytest.raises(KeyError, match="'q.weight'"):
        Transpose(("q.weight",))({"k.weight": torch.zeros(2, 2)}, passthrough=True)


def test_unread_keys_are_reported_unless_passthrough():
    tree = {"w": torch.zeros(2, 2), "norm": torch.ones(2)}

    with pytest.raises(ValueError, match="'norm'.*passthrough=True"):
        Transpose(("w",))(tree)
    assert list(Transpose(("w",))(tree, passthrough=True)) == ["w", "norm"]


def test_composition_checks_keys_across_stages():
    tree = {"x": torch.zeros(2, 3), "y": torch.zeros(3, 2), "z": torch.zeros(1)}

    out = (Transpose(("x",)) >> Transpose(("y",)) >> Drop(("z",)))(tree)

    assert list(out) == ["x", "y"]
    with pytest.raises(ValueError, match="'z'"):
        (Transpose(("x",)) >> Transpose(("x",)) >> Transpose(("y",)))(tree)


def test_parallel_rejects_shared_inputs_and_outputs():
    tree = {"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}

    with pytest.raises(ValueError, match="both read key 'a'"):
        (Transpose(("a",)) | rename("a", "c"))(tree, passthrough=True)
    with pytest.raises(ValueError, match="produce key 'c'"):
        (rename("a", "c") | rename("b", "c"))(tree)


def test_maps_plan_on_specs_without_data():
    spec = {"q": TensorSpec((8, 4), torch.bfloat16, torch.device("meta")), "k": TensorSpec((2, 4), torch.bfloat16, torch.device("meta"))}
    pipeline = Concatenate(("q", "k"), "qk", sizes=(8, 2)) >> Transpose(("qk",)) >> Cast(("qk",), dtype=torch.float32, from_dtype=torch.bfloat16)

    out = pipeline(spec)

    assert out == {"qk": TensorSpec((4, 10), torch.float32, torch.device("meta"))}
    assert pipeline.inverse()(out) == spec


def test_composed_plan_fuses_groups_end_to_end():
    spec = {"m.q": TensorSpec((2, 2), torch.float32), "m.k": TensorSpec((2, 2), torch.float32), "m.n": TensorSpec((2,), torch.float32)}
    pipeline = StripPrefix("m") >> Concatenate(("q", "k"), "qk", sizes=(2, 2))

    plan = pipeline.plan(spec, passthrough=True)

    assert [(g.inputs, g.outputs) for g in plan.groups] == [(("m.q", "m.k"), ("qk",)), (("m.n",), ("n",))]


def test_shards_cover_groups_disjointly():
    tree = {f"layers.{i}.w": torch.randn(2, 3) for i in range(7)}
    full = Transpose(pattern=r".*")

    parts = [Shard(full, 3, k)(tree) for k in range(3)]

    keys = [key for part in parts for key in part]
    assert sorted(keys) == sorted(tree)
    union = {k: v for part in parts for k, v in part.items()}
    assert_trees_equal({k: union[k] for k in tree}, full(tree))
    assert Shard(full, 3, 1).inverse().inverse() == Shard(full, 3, 1)
    back = Shard(full, 3, 1).inverse()(parts[1])
    assert_trees_equal(back, {k: tree[k] for k in parts[1]})


class AddsOne(StateMap):
    """A user map whose inverse is wrong on purpose: it adds one both ways."""

    def reads(self, spec):
        return set(spec)

    def _plan(self, spec):
        from ftpeft.maps import Group

        return [Group((k,), (k,), lambda t, k=k: {k: t[k] + 1}) for k in spec]

    def inverse(self):
        return self


def test_check_invertible_names_key_and_difference():
    with pytest.raises(AssertionError, match=r"'w'.*largest difference 2.0"):
        check_invertible(AddsOne(), {"w": torch.zeros(3)})


def test_drop_has_no_inverse():
    with pytest.raises(ValueError, match="no inverse"):
        Drop(("w",)).inverse()


def lora(pattern, r=2, alpha=2.0):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha)))


def test_merge_map_matches_merge_and_inverts_to_unmerge():
    method = lora(["b"])
    tree = method.inject({"a.weight": torch.randn(4, 4), "b.weight": torch.randn(4, 8)})
    tree["b.lora_B"] = torch.randn(4, 2)

    sheared = method.merge_map()(tree)

    assert set(sheared) == set(tree)
    assert torch.equal(sheared["b.weight"], method.merge(tree)["b.weight"])
    assert not method.merge_map().exact
    check_invertible(method.merge_map(), tree, atol=1e-6, rtol=1e-6)


def test_pipeline_load_inject_merge_export():
    # A checkpoint stored with a wrapper prefix and a fused qkv weight.
    checkpoint = {
        "model.attn.qkv.weight": torch.randn(12, 4),
        "model.attn.o.weight": torch.randn(4, 4),
        "model.norm.weight": torch.randn(4),
    }
    load = StripPrefix("model") >> Chunk("attn.qkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight"), sizes=(4, 4, 4))
    method = lora(["q", "v"])

    tree = method.inject(load(checkpoint, passthrough=True), generator=torch.Generator().manual_seed(0))
    tree = {k: (torch.randn(v.shape) if k.endswith("lora_B") else v) for k, v in tree.items()}
    export = method.merge_map() >> Drop(pattern=r".*\.lora_[AB]") >> load.inverse()
    exported = export(tree, passthrough=True)

    assert list(exported) == ["model.attn.qkv.weight", "model.attn.o.weight", "model.norm.weight"]
    assert torch.equal(exported["model.attn.o.weight"], checkpoint["model.attn.o.weight"])
    assert torch.equal(exported["model.norm.weight"], checkpoint["model.norm.weight"])
    q, k, v = exported["model.attn.qkv.weight"].split(4)
    base_q, base_k, base_v = checkpoint["model.attn.qkv.weight"].split(4)
    assert torch.equal(k, base_k)
    torch.testing.assert_close(q, base_q + tree["attn.q.lora_B"] @ tree["attn.q.lora_A"])
    torch.testing.assert_close(v, base_v + tree["attn.v.lora_B"] @ tree["attn.v.lora_A"])
    # Without the drop, the inverse pipeline restores the adapted tree.
    keep = method.merge_map() >> load.inverse()
    check_invertible(keep, tree, atol=1e-6, rtol=1e-6, passthrough=True)

"""Tests of ftpeft.io on real safetensors files: sharding, atomic writes, validation, maps."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ftpeft import LoRAConfig, LoRAParameters, TensorSpec, peft_method_from_config, spec_of
from ftpeft.io import CheckpointError, checkpoint_spec, iter_state, load_state, save_state
from ftpeft.maps import Chunk, Drop, SelectScope, StripPrefix

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


def sample_tree():
    generator = torch.Generator().manual_seed(0)
    tree = {}
    for index, dtype in enumerate(ALL_DTYPES):
        values = torch.randn(3, index + 1, generator=generator) * 50
        tree[f"layer.{index}.value"] = values > 0 if dtype == torch.bool else values.to(dtype)
    tree["scalar"] = torch.tensor(2.5)
    tree["empty"] = torch.zeros(0, 4)
    return tree


def assert_same(first, second):
    assert set(first) == set(second)
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert torch.equal(first[key], second[key]), key


def test_reads_files_written_by_safetensors(tmp_path):
    tree = sample_tree()
    save_file(tree, tmp_path / "model.safetensors", metadata={"format": "pt"})

    assert_same(load_state(tmp_path / "model.safetensors"), tree)
    assert_same(load_state(tmp_path), tree)
    assert checkpoint_spec(tmp_path)["layer.0.value"] == TensorSpec((3, 1), torch.float32)


@pytest.mark.parametrize("shard_size", [1, 30, 100, 10**9])
def test_sharded_round_trip(tmp_path, shard_size):
    tree = sample_tree()

    index_path = save_state(tmp_path / "out", tree, shard_size=shard_size)

    index = json.loads(index_path.read_text())
    files = set(index["weight_map"].values())
    assert set(index["weight_map"]) == set(tree)
    assert all((tmp_path / "out" / name).is_file() for name in files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in tree.values())
    on_disk = {}
    for name in files:
        shard = load_file(tmp_path / "out" / name)
        assert not set(shard) & set(on_disk)
        on_disk.update(shard)
    assert_same(on_disk, tree)
    assert_same(load_state(tmp_path / "out"), tree)
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_tensor_larger_than_shard_gets_own_shard(tmp_path):
    tree = {"small.a": torch.zeros(2), "big": torch.zeros(100), "small.b": torch.zeros(2)}

    index = json.loads(save_state(tmp_path, tree, shard_size=64).read_text())

    assert len(set(index["weight_map"].values())) == 3
    assert index["weight_map"]["big"] == "model-00002-of-00003.safetensors"


def test_shard_size_strings(tmp_path):
    save_state(tmp_path, {"a": torch.zeros(300)}, shard_size="1KiB")

    with pytest.raises(ValueError, match="'lots' is not a size"):
        save_state(tmp_path, {"a": torch.zeros(1)}, shard_size="lots")


def write_index(directory, weight_map):
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_stale_shard_is_neither_read_nor_rewritten(tmp_path):
    source, out = tmp_path / "source", tmp_path / "out"
    source.mkdir()
    a, b = torch.randn(4, 4), torch.randn(4, 8)
    save_file({"a.weight": a}, source / "model-00001-of-00002.safetensors")
    save_file({"b.weight": b}, source / "model-00002-of-00002.safetensors")
    write_index(source, {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"})
    stale = source / "model-00001-of-00001.safetensors"
    save_file({"a.weight": torch.ones(4, 4), "b.weight": torch.ones(8, 8)}, stale)
    stale_bytes = stale.read_bytes()

    method = peft_method_from_config(LoRAConfig(module_name_pattern=["b"], params=LoRAParameters(r=2, alpha=2)))
    tree = load_state(source)
    tree["b.lora_A"], tree["b.lora_B"] = torch.randn(2, 8), torch.randn(4, 2)
    merged = method.merge(tree)
    save_state(out, merged)

    assert torch.equal(tree["b.weight"], b)
    torch.testing.assert_close(merged["b.weight"], b + tree["b.lora_B"] @ tree["b.lora_A"])
    assert_same(load_state(out), merged)
    assert stale.read_bytes() == stale_bytes


def test_save_replaces_index_and_leaves_other_files(tmp_path):
    save_state(tmp_path, {"a": torch.zeros(10), "b": torch.zeros(10)}, shard_size=40)
    save_state(tmp_path, {"c": torch.ones(3)})

    assert_same(load_state(tmp_path), {"c": torch.ones(3)})
    assert (tmp_path / "model-00002-of-00002.safetensors").is_file()


def test_crash_during_save_leaves_no_final_file(tmp_path):
    def trees():
        yield {"a": torch.zeros(100)}
        yield {"b": torch.zeros(100)}
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        save_state(tmp_path / "out", trees(), shard_size=64)

    assert os.listdir(tmp_path / "out") == []


def test_index_naming_missing_file_is_named(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "one.safetensors")
    write_index(tmp_path, {"a": "one.safetensors", "b": "two.safetensors"})

    with pytest.raises(FileNotFoundError, match="'b' to 'two.safetensors'"):
        load_state(tmp_path)


def test_index_naming_missing_tensor_is_named(tmp_path):
    save_file({"a": torch.zeros(1)}, tmp_path / "one.safetensors")
    write_index(tmp_path, {"a": "one.safetensors", "b": "one.safetensors"})

    with pytest.raises(CheckpointError, match="no tensor 'b'"):
        load_state(tmp_path)


def test_truncated_file_is_named(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(100)}, file)
    file.write_bytes(file.read_bytes()[:-10])

    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_state(tmp_path)


def test_corrupt_header_is_named(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")

    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load_state(file)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_state(tmp_path / "nowhere")


def test_load_through_map_with_prefix_and_fused_qkv(tmp_path):
    checkpoint = {"model.attn.qkv.weight": torch.randn(12, 4), "model.norm.weight": torch.randn(4)}
    save_file(checkpoint, tmp_path / "model.safetensors")
    load = StripPrefix("model") >> Chunk("attn.qkv.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight"), sizes=(4, 4, 4))

    tree = load_state(tmp_path, load, passthrough=True)

    assert list(tree) == ["attn.q.weight", "attn.k.weight", "attn.v.weight", "norm.weight"]
    assert torch.equal(tree["attn.k.weight"], checkpoint["model.attn.qkv.weight"][4:8])


def test_load_reads_data_only_of_groups_that_produce_output(tmp_path):
    save_file({"encoder.w": torch.ones(3)}, tmp_path / "model-00001-of-00002.safetensors")
    second = tmp_path / "model-00002-of-00002.safetensors"
    save_file({"decoder.w": torch.ones(1000)}, second)
    write_index(tmp_path, {"encoder.w": "model-00001-of-00002.safetensors", "decoder.w": "model-00002-of-00002.safetensors"})
    # Scramble the decoder's data bytes but keep its header valid.
    raw = bytearray(second.read_bytes())
    raw[-4000:] = b"\xff" * 4000
    second.write_bytes(bytes(raw))

    tree = load_state(tmp_path, SelectScope("encoder"))

    assert_same(tree, {"w": torch.ones(3)})


def test_load_checks_against_meta_planned_spec(tmp_path):
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["0"]))
    planned = method.inject(spec_of(model))
    weights = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3), "1.weight": torch.randn(2, 3), "1.bias": torch.randn(2)}
    save_file(weights, tmp_path / "model.safetensors")

    tree = method.inject(load_state(tmp_path, spec=planned))

    assert set(tree) == set(planned)
    planned_wrong = {**planned, "1.weight": TensorSpec((2, 4), torch.float32)}
    with pytest.raises(ValueError, match=r"'1.weight' has shape \(2, 3\).*expects shape \(2, 4\)"):
        load_state(tmp_path, spec=planned_wrong)
    planned_more = {**planned, "2.weight": TensorSpec((2, 2), torch.float32)}
    with pytest.raises(ValueError, match="no value for key\\(s\\) '2.weight'"):
        load_state(tmp_path, spec=planned_more)
    with pytest.raises(ValueError, match="'1.bias' that the spec does not have"):
        load_state(tmp_path, spec={k: v for k, v in planned.items() if k != "1.bias"})


def test_load_casts_dtype_and_places_device(tmp_path):
    save_file({"w": torch.randn(2, 2), "ids": torch.arange(3)}, tmp_path / "model.safetensors")

    tree = load_state(tmp_path, dtype=torch.bfloat16, device="meta")

    assert tree["w"].dtype == torch.bfloat16
    assert tree["ids"].dtype == torch.int64
    assert tree["w"].device.type == "meta"


def test_streamed_conversion_through_maps(tmp_path):
    source = {f"model.layers.{i}.w": torch.randn(8, 8) for i in range(6)}
    save_state(tmp_path / "source", source, shard_size=600)

    save_state(tmp_path / "out", iter_state(tmp_path / "source", StripPrefix("model")), shard_size=600, progress=False)

    assert_same(load_state(tmp_path / "out"), {k.removeprefix("model."): v for k, v in source.items()})


def test_save_through_map_drops_adapters(tmp_path):
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["w"], params=LoRAParameters(r=2, alpha=2)))
    tree = method.inject({"w.weight": torch.randn(3, 3), "n": torch.ones(3)})
    tree["w.lora_B"] = torch.randn(3, 2)

    save_state(tmp_path, tree, method.merge_map() >> Drop(pattern=r".*lora_[AB]"), passthrough=True)

    assert_same(load_state(tmp_path), method.merge(tree))


def test_save_rejects_repeated_key(tmp_path):
    with pytest.raises(ValueError, match="'a' twice"):
        save_state(tmp_path, [{"a": torch.zeros(1)}, {"a": torch.ones(1)}])


def test_streamed_save_writes_tensors_as_they_arrive(tmp_path):
    source = {f"w{i}": torch.randn(10, 10) for i in range(5)}
    save_state(tmp_path / "source", source, shard_size=1000)
    stream = iter_state(tmp_path / "source", dtype=torch.float64)

    assert list(stream.spec) == list(source)
    assert stream.spec["w0"].dtype == torch.float64
    save_state(tmp_path / "out", stream, shard_size=1000)

    loaded = load_state(tmp_path / "out")
    assert_same(loaded, {k: v.double() for k, v in source.items()})
    assert len(set(json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"].values())) == 5


def test_stream_that_breaks_its_spec_leaves_nothing(tmp_path):
    from ftpeft.io._state import StateStream

    stream = StateStream({"a": TensorSpec((2,), torch.float32)}, iter([{"a": torch.zeros(3)}]))

    with pytest.raises(ValueError, match="expected 'a' \\(2,\\)"):
        save_state(tmp_path, stream)
    assert os.listdir(tmp_path) == []

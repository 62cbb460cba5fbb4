"""Tests of ftpeft.distributed on real gloo process groups, DTensors, FSDP2 and safetensors files.

Multi-process tests start their workers with ``torch.multiprocessing`` on
127.0.0.1. Each worker computes the single-process result on the same seed
itself and compares its distributed result with it. An assertion in any
worker fails the test with that worker's traceback.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, split_trainable
from ftpeft.distributed import (
    convert_checkpoint,
    distribute,
    distribute_adapters,
    fsdp_forward,
    gather,
    lora_placements,
    reduce_gradients,
    save_gathered,
    shard,
)
from ftpeft.io import AdapterMerge, iter_state, load_state, save_state
from ftpeft.maps import Shard as ShardMap
from ftpeft.maps import Drop, StripPrefix

from conftest import TwoLayerMLP, state_of, tiny_llama

LLAMA_TARGETS = r".*\.(q_proj|v_proj|o_proj|down_proj)"

# gloo connects its ranks over the interface this names; the loopback keeps every test on 127.0.0.1,
# whatever the host name resolves to. Spawned workers and torchrun inherit it.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def lora(pattern, r=2, alpha=4.0, **params):
    return peft_method_from_config(LoRAConfig(module_name_pattern=pattern, params=LoRAParameters(r=r, alpha=alpha, **params)))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _bootstrap(rank: int, worker, world: int, port: int, args: tuple, finished: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        worker(rank, world, *args)
        # No rank tears the group down while another still talks to it.
        dist.barrier()
        Path(finished, str(rank)).touch()
    finally:
        dist.destroy_process_group()


def run_workers(worker, world: int, *args) -> None:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned processes that share a gloo group on 127.0.0.1."""
    with tempfile.TemporaryDirectory() as finished:
        try:
            mp.start_processes(
                _bootstrap, args=(worker, world, free_port(), args, finished), nprocs=world, start_method="spawn", join=True
            )
        except mp.ProcessExitedException as error:
            # NOTE: torch 2.13's gloo now and then aborts a process in destroy_process_group
            # ("terminate called without an active exception"), after every check has passed.
            # Only that case is let through: every rank must have finished its worker and the barrier.
            if error.signal_name != "SIGABRT" or len(os.listdir(finished)) != world:
                raise


@pytest.fixture
def single_rank_group():
    """A gloo group of one rank in this process, for DTensors on a one-rank mesh."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def assert_close(actual, expected, label, atol=1e-5):
    actual = actual.full_tensor() if isinstance(actual, DTensor) else actual
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5, msg=lambda m: f"{label}: {m}")


def random_lora_b(tree, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) * 0.1 if k.endswith("lora_B") else v) for k, v in tree.items()}


def full_value(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


# --- tensor parallelism: a transformers Llama through parallelize_module -----------------------------------


def _llama_tensor_parallel_plan(num_layers):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[prefix + name] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[prefix + name] = RowwiseParallel()
    return plan


def _tensor_parallel_worker(rank, world):
    from torch.distributed.tensor.parallel import parallelize_module

    torch.manual_seed(0)
    model = tiny_llama()
    method = lora(LLAMA_TARGETS, r=4, alpha=8.0)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))

    # The single-process result on the same seed.
    tree = random_lora_b(method.inject(state_of(model), generator=torch.Generator().manual_seed(0)))
    trainable, frozen = split_trainable(method, tree)
    trainable = {k: v.clone().requires_grad_() for k, v in trainable.items()}
    expected = functional_forward(model, method)((trainable, frozen), input_ids=ids).logits
    expected_loss = expected.pow(2).mean()
    expected_grads = dict(zip(trainable, torch.autograd.grad(expected_loss, list(trainable.values()))))
    expected_merged = method.merge(tree)

    parallelize_module(model, init_device_mesh("cpu", (world,)), _llama_tensor_parallel_plan(2))
    injected = method.inject(model.state_dict(), generator=torch.Generator().manual_seed(0))
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    assert injected[f"{q}.lora_B"].placements == (Shard(0),)
    assert injected[f"{q}.lora_A"].placements == (Replicate(),)
    assert injected[f"{o}.lora_A"].placements == (Shard(1),)
    assert injected[f"{o}.lora_B"].placements == (Replicate(),)
    assert_close(injected[f"{q}.lora_A"], tree[f"{q}.lora_A"], "lora_A drawn from the same generator")

    # Give the sharded tree the reference's random B, placed by the default rule.
    with_b = {k: (tree[k] if k.endswith("lora_B") else v) for k, v in injected.items()}
    sharded = distribute_adapters(method, with_b)
    d_trainable, d_frozen = split_trainable(method, sharded)
    d_trainable = {k: v.detach().requires_grad_() for k, v in d_trainable.items()}
    logits = functional_forward(model, method)((d_trainable, d_frozen), input_ids=ids).logits
    assert_close(logits, expected, "logits")

    loss = logits.pow(2).mean()
    assert_close(loss, expected_loss, "loss")
    grads = reduce_gradients(dict(zip(d_trainable, torch.autograd.grad(loss, list(d_trainable.values())))), d_trainable)
    for key, grad in grads.items():
        assert grad.placements == d_trainable[key].placements, key
        assert_close(grad, expected_grads[key], f"gradient of {key}")

    before = {k: v.to_local().clone() for k, v in sharded.items() if isinstance(v, DTensor)}
    with CommDebugMode() as comms:
        merged = method.merge(sharded)
        restored = method.unmerge(merged, {k: sharded[k] for k in method.adapter_keys(sharded)})
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    for key, local in before.items():
        assert torch.equal(sharded[key].to_local(), local), f"merge or unmerge changed its input {key}"
    for key, value in expected_merged.items():
        assert_close(merged[key], value, f"merged {key}", atol=1e-6)
        if isinstance(merged[key], DTensor):
            assert merged[key].placements == sharded[key].placements, key
    for key in sharded:
        assert_close(restored[key], full_value(sharded[key]), f"unmerged {key}", atol=1e-6)

    mesh = init_device_mesh("cpu", (world,))
    _check_convolution_merge(mesh)
    _check_merge_with_other_placements(mesh)
    _check_layer_kinds_merge(mesh)


def _check_convolution_merge(mesh):
    """Merge LoRA into a Conv2d kernel split along each of its dimensions, with no collective."""
    method = lora(["conv"])
    kernel = {"conv.weight": torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(4))}
    tree = random_lora_b(method.inject(kernel, generator=torch.Generator().manual_seed(0)))
    expected = method.merge(tree)["conv.weight"]
    for placement in (Shard(0), Shard(1), Shard(2)):
        sharded = distribute_adapters(method, {**tree, "conv.weight": distribute_tensor(kernel["conv.weight"], mesh, [placement])})
        with CommDebugMode() as comms:
            merged = method.merge(sharded)["conv.weight"]
        assert comms.get_total_counts() == 0, (placement, comms.get_comm_counts())
        assert merged.placements == (placement,)
        assert_close(merged, expected, f"kernel merged with {placement!r}", atol=1e-6)


def _check_merge_with_other_placements(mesh):
    """Merge and unmerge with adapter placements that differ from the default rule: DTensor's own ops do the math."""
    method = lora(["up", "down"])
    tree = random_lora_b(method.inject(state_of(TwoLayerMLP()), generator=torch.Generator().manual_seed(0)))
    expected = method.merge(tree)
    base = {k: (distribute_tensor(v, mesh, [Shard(0)]) if k.endswith("weight") else v) for k, v in tree.items() if "lora_" not in k}
    for rule in ({r".*": [Replicate()]}, {r".*\.lora_A": [Shard(0)], r".*\.lora_B": [Shard(1)]}):
        sharded = distribute_adapters(method, {**base, **{k: v for k, v in tree.items() if "lora_" in k}}, rule)
        merged = method.merge(sharded)
        for key, value in expected.items():
            assert_close(merged[key], value, f"merged {key} with {rule}", atol=1e-6)
        restored = method.unmerge(merged, {k: sharded[k] for k in method.adapter_keys(sharded)})
        for key, value in tree.items():
            assert_close(restored[key], value, f"unmerged {key} with {rule}", atol=1e-6)


def _check_layer_kinds_merge(mesh):
    """Place, merge and unmerge an embedding table with DoRA, a DoRA linear and an expert stack, each split two ways."""
    generator = torch.Generator().manual_seed(5)
    base = {
        "embed.weight": torch.randn(8, 6, generator=generator),
        "proj.weight": torch.randn(4, 6, generator=generator),
        "experts.stack": torch.randn(2, 4, 6, generator=generator),
    }
    dora = peft_method_from_config(
        LoRAConfig(module_name_pattern=["embed", "proj"], embedding_pattern=["embed"], params=LoRAParameters(r=2, alpha=4.0, use_dora=True))
    )
    experts = peft_method_from_config(LoRAConfig(parameter_pattern=["experts.stack"], params=LoRAParameters(r=2, alpha=4.0)))

    for method in (dora, experts):
        tree = method.inject(base, generator=torch.Generator().manual_seed(0))
        tree = {k: (torch.randn(v.shape, generator=generator) if "lora" in k and "magnitude" not in k else v) for k, v in tree.items()}
        expected = method.merge(tree)
        for placement in (Shard(0), Shard(1)):
            sharded = distribute_adapters(method, {k: (distribute_tensor(v, mesh, [placement]) if "lora" not in k else v) for k, v in tree.items()})
            adapter = {k: sharded[k] for k in method.adapter_keys(sharded)}
            assert all(isinstance(value, DTensor) for value in adapter.values())
            norms = method.weight_norms(sharded) if method is dora else {}
            merged = method.merge(sharded)
            restored = method.unmerge(merged, {**adapter, **norms})
            for key, value in expected.items():
                assert merged[key].placements == (placement,), key
                assert_close(merged[key], value, f"merged {key} with {placement!r}", atol=1e-5)
            for key, value in tree.items():
                assert_close(restored[key], value, f"unmerged {key} with {placement!r}", atol=1e-5)

    # inject on a DTensor tree places A and B first, then computes DoRA's magnitude from them.
    for placement in (Shard(0), Shard(1)):
        direct = dora.inject({k: distribute_tensor(v, mesh, [placement]) for k, v in base.items()}, generator=torch.Generator().manual_seed(0))
        plain = dora.inject(base, generator=torch.Generator().manual_seed(0))
        for key in ("embed.lora_magnitude_vector", "proj.lora_magnitude_vector"):
            assert isinstance(direct[key], DTensor), key
            assert_close(direct[key], plain[key], f"{key} injected with {placement!r}", atol=1e-6)

    # A row-split table (Shard(0), its num_embeddings) splits A's columns and keeps B whole.
    table = distribute_adapters(dora, {**dora.inject(base), "embed.weight": distribute_tensor(base["embed.weight"], mesh, [Shard(0)])})
    assert table["embed.lora_embedding_A"].placements == (Shard(1),)
    assert table["embed.lora_embedding_B"].placements == (Replicate(),)
    assert table["embed.lora_magnitude_vector"].placements == (Replicate(),)


def test_tensor_parallel_llama_matches_single_process():
    run_workers(_tensor_parallel_worker, 2)


# --- a 2-D mesh: data parallel times tensor parallel --------------------------------------------------------


def _mesh_2d_worker(rank, world):
    torch.manual_seed(0)
    model = TwoLayerMLP()
    method = lora(["up", "down"], lora_bias=True)
    generator = torch.Generator().manual_seed(3)
    inputs, targets = torch.randn(8, 6, generator=generator), torch.randn(8, 4, generator=generator)
    learning_rate, steps = 0.5, 3

    def train(forward, trainable, frozen, x, y):
        losses = []
        for _ in range(steps):
            loss = (forward((trainable, frozen), x) - y).pow(2).mean()
            grads = dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()))))
            if isinstance(loss, DTensor):
                grads = reduce_gradients(grads, trainable)
                for key, grad in grads.items():
                    assert grad.placements == trainable[key].placements, key
            losses.append(full_value(loss).item())
            trainable = {k: (v - learning_rate * grads[k]).detach().requires_grad_() for k, v in trainable.items()}
        return losses, trainable

    tree = random_lora_b(method.inject(state_of(model), generator=torch.Generator().manual_seed(0)))
    trainable, frozen = split_trainable(method, tree)
    trainable = {k: v.clone().requires_grad_() for k, v in trainable.items()}
    expected_losses, expected_trained = train(functional_forward(model, method), trainable, frozen, inputs, targets)

    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
    placements = {
        "up.weight": [Replicate(), Shard(0)],
        "up.bias": [Replicate(), Shard(0)],
        "down.weight": [Replicate(), Shard(1)],
        "down.bias": [Replicate(), Replicate()],
    }
    base = {k: distribute_tensor(v, mesh, placements[k]) for k, v in state_of(model).items()}
    injected = method.inject(base, generator=torch.Generator().manual_seed(0))
    assert injected["up.lora_B"].placements == (Replicate(), Shard(0))
    assert injected["down.lora_A"].placements == (Replicate(), Shard(1))
    assert injected["up.lora_bias"].placements == (Replicate(), Shard(0))
    assert injected["down.lora_bias"].placements == (Replicate(), Replicate())
    sharded = distribute_adapters(method, {k: (tree[k] if k.endswith("lora_B") else v) for k, v in injected.items()})
    d_trainable, d_frozen = split_trainable(method, sharded)
    d_trainable = {k: v.detach().requires_grad_() for k, v in d_trainable.items()}
    # The batch is split over the data-parallel mesh dimension.
    batch = [Shard(0), Replicate()]
    losses, trained = train(
        functional_forward(model, method),
        d_trainable,
        d_frozen,
        distribute_tensor(inputs, mesh, batch),
        distribute_tensor(targets, mesh, batch),
    )

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), atol=1e-5, rtol=1e-5)
    for key, value in expected_trained.items():
        assert_close(trained[key], value.detach(), f"trained {key}")

    expected_merged = method.merge({**frozen, **expected_trained})
    with CommDebugMode() as comms:
        merged = method.merge({**d_frozen, **trained})
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    for key, value in expected_merged.items():
        assert_close(merged[key], value.detach(), f"merged {key}", atol=1e-6)


def test_two_dim_mesh_training_matches_single_process():
    run_workers(_mesh_2d_worker, 4)


# --- FSDP2 ---------------------------------------------------------------------------------------------------


def _fsdp_worker(rank, world, steps, mesh_shape):
    from torch.distributed.fsdp import FSDPModule, fully_shard

    torch.manual_seed(0)
    model = tiny_llama()
    method = lora(LLAMA_TARGETS, r=4, alpha=8.0)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(2))

    def train(forward, trainable, input_ids, reduce):
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = forward(trainable, input_ids=input_ids, labels=input_ids).loss
            grads = dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values()))))
            if reduce:
                grads = reduce_gradients(grads, trainable)
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss = loss / world
            for key, value in trainable.items():
                value.grad = grads[key]
            optimizer.step()
            losses.append(loss.item())
        return losses

    tree = method.inject(state_of(model), generator=torch.Generator().manual_seed(0))
    trainable, frozen = split_trainable(method, tree)
    expected = {k: v.clone().requires_grad_() for k, v in trainable.items()}
    forward = functional_forward(model, method)
    expected_losses = train(lambda t, **kw: forward((t, frozen), **kw), expected, ids, reduce=False)
    expected_merged = method.merge({**frozen, **expected})

    # The user's sharding code: a frozen base, one FSDP unit per decoder layer and one for the rest.
    # A 2-D mesh shape gives HSDP: weights replicated across its first dimension, sharded across its second.
    names = ("replicate", "shard")[-len(mesh_shape):]
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    shards_before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    adapters = {k: v.clone().requires_grad_() for k, v in trainable.items()}
    rows = ids.shape[0] // world
    local_ids = ids[rank * rows : (rank + 1) * rows]
    losses = train(fsdp_forward(model, method), adapters, local_ids, reduce=True)

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), atol=1e-5, rtol=1e-5)
    for key, value in expected.items():
        assert_close(adapters[key].detach(), value.detach(), f"trained {key}")
    for key, local in shards_before.items():
        assert torch.equal(model.state_dict()[key].to_local(), local), f"training changed the frozen base weight {key}"
    plain_modules = [module for module in model.modules() if not isinstance(module, FSDPModule)]
    assert not any(module._forward_pre_hooks for module in plain_modules), "fsdp_forward removes its hooks"

    # Merge into the FSDP-sharded base weights without gathering them.
    sharded = distribute_adapters(method, {**model.state_dict(), **{k: v.detach() for k, v in adapters.items()}})
    with CommDebugMode() as comms:
        merged = method.merge(sharded)
    assert comms.get_total_counts() == 0, comms.get_comm_counts()
    for key, value in expected_merged.items():
        assert_close(merged[key], value.detach(), f"merged {key}", atol=1e-6)


def test_fsdp2_training_matches_single_process():
    run_workers(_fsdp_worker, 2, 3, (2,))


@pytest.mark.distributed_slow
def test_hsdp_four_ranks_matches_single_process():
    run_workers(_fsdp_worker, 4, 4, (2, 2))


# --- maps and checkpoint conversion with N workers -----------------------------------------------------------


def _write_source(directory: Path):
    """Write a sharded checkpoint of a small stack of layers and return the LoRA method and an adapter for it."""
    generator = torch.Generator().manual_seed(0)
    tree = {}
    for layer in range(6):
        tree[f"model.layers.{layer}.proj.weight"] = torch.randn(8, 6, generator=generator)
        tree[f"model.layers.{layer}.proj.bias"] = torch.randn(8, generator=generator)
        tree[f"model.layers.{layer}.norm.weight"] = torch.randn(6, generator=generator).to(torch.bfloat16)
    save_state(directory, tree, shard_size=300)
    method = lora(r"model\.layers\.\d\.proj")
    adapter = {k: v for k, v in random_lora_b(method.inject(tree, generator=generator)).items() if "lora_" in k}
    return method, adapter


def _convert_worker(rank, world, source, target, exported, method, adapter):
    convert_checkpoint(source, target, AdapterMerge(method, adapter), shard_size=400)
    assert (Path(target) / "model.safetensors.index.json").is_file(), "every worker returns after the index exists"

    # Workers started with different arguments plan different shards; every worker raises before any index.
    with pytest.raises(ValueError, match=r"Worker\(s\) \[1\] planned other output shards"):
        convert_checkpoint(source, Path(target).with_name("mixed"), shard_size=400 if rank == 0 else 10**6)
    assert not (Path(target).with_name("mixed") / "model.safetensors.index.json").exists()

    # Merge shard-local into a DTensor tree, then gather group by group and write from rank 0.
    mesh = init_device_mesh("cpu", (world,))
    base = load_state(source, distribute(pattern=r".*proj\.weight", mesh=mesh, placements=[Shard(0)]), passthrough=True)
    tree = distribute_adapters(method, {**base, **adapter})
    export = method.merge_map() >> Drop(sorted(adapter)) >> gather(pattern=".*")
    result = save_gathered(exported, tree, export, shard_size=400)
    assert (result is not None) == (rank == 0)
    assert (Path(exported) / "model.safetensors.index.json").is_file(), "every rank returns after the writer is done"

    # A load pipeline that ends in DTensors, and its inverse that gathers them.
    def placements(key, spec):
        return [Shard(0)] if key.endswith("proj.weight") else [Replicate()]

    to_dtensors = StripPrefix("model") >> distribute(pattern=".*", mesh=mesh, placements=placements)
    loaded = load_state(source, to_dtensors)
    plain = load_state(source)
    assert loaded["layers.1.proj.weight"].placements == (Shard(0),)
    rows = 8 // world
    assert torch.equal(loaded["layers.1.proj.weight"].to_local(), plain["model.layers.1.proj.weight"][rank * rows : (rank + 1) * rows])
    assert loaded["layers.1.norm.weight"].dtype == torch.bfloat16
    back = to_dtensors.inverse()(loaded)
    assert list(back) == list(plain)
    for key, value in plain.items():
        assert type(back[key]) is torch.Tensor, key
        assert torch.equal(back[key], value), key


def test_convert_with_process_group_matches_one_worker(tmp_path):
    source = tmp_path / "source"
    method, adapter = _write_source(source)
    run_workers(_convert_worker, 2, str(source), str(tmp_path / "two"), str(tmp_path / "exported"), method, adapter)

    save_state(tmp_path / "one", iter_state(source, AdapterMerge(method, adapter)), shard_size=400)
    assert_same_checkpoint(tmp_path / "two", tmp_path / "one")
    assert not list((tmp_path / "two").glob(".ftpeft-*")), "markers and temporary files are removed"

    expected = method.merge({**load_state(source), **adapter})
    exported = load_state(tmp_path / "exported")
    assert set(exported) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=0, msg=lambda m, key=key: f"exported {key}: {m}")


def assert_same_checkpoint(actual: Path, expected: Path) -> None:
    actual_index = json.loads((actual / "model.safetensors.index.json").read_text())
    expected_index = json.loads((expected / "model.safetensors.index.json").read_text())
    assert set(actual_index["weight_map"]) == set(expected_index["weight_map"])
    assert actual_index["metadata"] == expected_index["metadata"]
    actual_tensors = {k: v for name in set(actual_index["weight_map"].values()) for k, v in load_file(actual / name).items()}
    expected_tensors = {k: v for name in set(expected_index["weight_map"].values()) for k, v in load_file(expected / name).items()}
    assert set(actual_tensors) == set(expected_tensors)
    for key, value in expected_tensors.items():
        assert actual_tensors[key].dtype == value.dtype, key
        assert actual_tensors[key].shape == value.shape, key
        assert actual_tensors[key].contiguous().view(torch.uint8).numpy().tobytes() == value.contiguous().view(torch.uint8).numpy().tobytes(), key


def test_convert_without_process_group_matches_one_worker(tmp_path):
    source = tmp_path / "source"
    method, adapter = _write_source(source)
    merge = AdapterMerge(method, adapter)
    before = {path.name: path.read_bytes() for path in source.iterdir()}

    # Workers 1 and 2 leave marker files; worker 0 finds them and writes the index.
    for worker in (2, 1, 0):
        result = convert_checkpoint(source, tmp_path / "three", merge, count=3, index=worker, shard_size=400)
        assert (result is None) == (worker != 0)
    save_state(tmp_path / "one", iter_state(source, merge), shard_size=400)

    assert_same_checkpoint(tmp_path / "three", tmp_path / "one")
    assert not list((tmp_path / "three").glob(".ftpeft-*"))
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before, "the source is unchanged"


def test_convert_one_worker_matches_bytes(tmp_path):
    source = tmp_path / "source"
    method, adapter = _write_source(source)
    merge = AdapterMerge(method, adapter)

    convert_checkpoint(source, tmp_path / "converted", merge, shard_size=400)
    save_state(tmp_path / "saved", iter_state(source, merge), shard_size=400)

    converted = sorted(path.name for path in (tmp_path / "converted").iterdir())
    assert converted == sorted(path.name for path in (tmp_path / "saved").iterdir())
    for name in converted:
        assert (tmp_path / "converted" / name).read_bytes() == (tmp_path / "saved" / name).read_bytes(), name


def test_convert_worker_zero_times_out_naming_missing_workers(tmp_path):
    source = tmp_path / "source"
    _write_source(source)
    convert_checkpoint(source, tmp_path / "out", count=3, index=1)

    with pytest.raises(TimeoutError, match=r"Worker\(s\) \[2\] of 3"):
        convert_checkpoint(source, tmp_path / "out", count=3, index=0, timeout=0.5)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_convert_worker_zero_ignores_other_layouts(tmp_path):
    source = tmp_path / "source"
    _write_source(source)
    convert_checkpoint(source, tmp_path / "out", count=2, index=1, shard_size=400)

    # Worker 1 planned other shards, so its marker does not count for this run.
    with pytest.raises(TimeoutError, match=r"Worker\(s\) \[1\] of 2"):
        convert_checkpoint(source, tmp_path / "out", count=2, index=0, shard_size=10**6, timeout=0.5)


def test_convert_hundred_shards_with_four_workers(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tree = {f"layers.{i}.proj.weight": torch.randn(4, 4, generator=generator) for i in range(100)}
    save_state(tmp_path / "base", tree, shard_size=64)
    method = lora(r"layers\.\d+\.proj")
    adapter = {k: v for k, v in random_lora_b(method.inject(tree, generator=generator)).items() if "lora_" in k}
    merge = AdapterMerge(method, adapter)

    for worker in (1, 2, 3, 0):
        convert_checkpoint(tmp_path / "base", tmp_path / "four", merge, count=4, index=worker, shard_size=64)
    save_state(tmp_path / "one", iter_state(tmp_path / "base", merge), shard_size=64)

    assert len(list((tmp_path / "base").glob("*.safetensors"))) == 100
    assert len(list((tmp_path / "four").glob("*.safetensors"))) == 100
    assert_same_checkpoint(tmp_path / "four", tmp_path / "one")


def test_convert_rejects_bad_worker_numbers(tmp_path):
    source = tmp_path / "source"
    _write_source(source)
    with pytest.raises(ValueError, match="count=2, index=2"):
        convert_checkpoint(source, tmp_path / "out", count=2, index=2)
    with pytest.raises(ValueError, match="Drop the suffix"):
        convert_checkpoint(source, tmp_path / "out.safetensors")


def test_shard_constructor_deals_groups_round_robin(tmp_path):
    source = tmp_path / "source"
    _write_source(source)
    spec = {k: v for k, v in load_state(source).items()}
    owned = [shard(StripPrefix("model"), 4, index).plan(spec).outputs for index in range(4)]

    assert shard(StripPrefix("model"), 4, 1) == ShardMap(StripPrefix("model"), 4, 1)
    assert sorted(key for keys in owned for key in keys) == sorted(StripPrefix("model")(spec))
    assert all(not set(owned[i]) & set(owned[j]) for i in range(4) for j in range(i))


# --- placement rules and errors, on a one-rank group in this process -------------------------------------


@pytest.mark.parametrize(
    ("weight_placement", "transposed", "expected_a", "expected_b", "expected_bias"),
    [
        (Shard(0), False, Replicate(), Shard(0), Shard(0)),
        (Shard(1), False, Shard(1), Replicate(), Replicate()),
        (Shard(-1), False, Shard(1), Replicate(), Replicate()),
        (Replicate(), False, Replicate(), Replicate(), Replicate()),
        (Shard(0), True, Shard(1), Replicate(), Replicate()),
        (Shard(1), True, Replicate(), Shard(0), Shard(0)),
    ],
)
def test_lora_placements_follow_weight(single_rank_group, weight_placement, transposed, expected_a, expected_b, expected_bias):
    weight = distribute_tensor(torch.randn(6, 6), single_rank_group, [weight_placement])

    assert lora_placements("lora_A", weight, transposed=transposed) == (expected_a,)
    assert lora_placements("lora_B", weight, transposed=transposed) == (expected_b,)
    assert lora_placements("lora_bias", weight, transposed=transposed) == (expected_bias,)


def test_lora_placements_for_convolution_kernel(single_rank_group):
    by_input = distribute_tensor(torch.randn(4, 3, 3, 3), single_rank_group, [Shard(1)])
    by_kernel = distribute_tensor(torch.randn(4, 3, 3, 3), single_rank_group, [Shard(2)])

    assert lora_placements("lora_A", by_input) == (Shard(1),)
    assert lora_placements("lora_A", by_kernel) == (Replicate(),)
    assert lora_placements("lora_B", by_kernel) == (Replicate(),)


def test_lora_placements_reject_partial_weight(single_rank_group):
    weight = DTensor.from_local(torch.randn(4, 4), single_rank_group, [Partial()])

    with pytest.raises(ValueError, match="Partial.*Redistribute the weight"):
        lora_placements("lora_B", weight)


def test_inject_places_adapters_and_keeps_input(single_rank_group):
    model = TwoLayerMLP()
    method = lora(["up", "down"])
    base = {k: distribute_tensor(v, single_rank_group, [Shard(0)]) for k, v in state_of(model).items()}
    snapshot = dict(base)

    tree = method.inject(base, generator=torch.Generator().manual_seed(0))
    plain = method.inject(state_of(model), generator=torch.Generator().manual_seed(0))

    assert base == snapshot, "inject leaves its input unchanged"
    assert set(tree) - set(base) == {"up.lora_A", "up.lora_B", "down.lora_A", "down.lora_B"}
    assert tree["up.lora_B"].placements == (Shard(0),)
    assert tree["up.lora_A"].placements == (Replicate(),)
    assert torch.equal(tree["up.lora_A"].full_tensor(), plain["up.lora_A"])
    assert type(plain["up.lora_A"]) is torch.Tensor, "plain bases keep plain adapters"


def test_distribute_adapters_override(single_rank_group):
    method = lora(["up", "down"])
    base = {k: distribute_tensor(v, single_rank_group, [Shard(0)]) for k, v in state_of(TwoLayerMLP()).items()}
    tree = method.inject(base)

    by_callable = distribute_adapters(method, tree, lambda key, weight: [Replicate()] if key.endswith("lora_B") else None)
    by_mapping = distribute_adapters(method, tree, {r"up\.lora_.*": [Shard(1)]})

    assert by_callable["up.lora_B"].placements == (Replicate(),)
    assert by_callable["up.lora_A"].placements == (Replicate(),), "None keeps the default"
    assert by_mapping["up.lora_A"].placements == (Shard(1),)
    assert by_mapping["down.lora_B"].placements == (Shard(0),)
    with pytest.raises(ValueError, match=r"'up.lora_A' of shape \(2, 6\)"):
        distribute_adapters(method, tree, {"up.lora_A": [Shard(2)]})
    with pytest.raises(ValueError, match="2 entries, but the mesh of 'up.weight' has 1"):
        distribute_adapters(method, tree, {"up.lora_A": [Shard(0), Shard(0)]})


def test_distribute_map_checks_placements(single_rank_group):
    tree = {"w": torch.randn(3, 4)}

    with pytest.raises(ValueError, match=r"'w' of shape \(3, 4\) as Shard\(dim=2\)"):
        distribute("w", single_rank_group, [Shard(2)])(tree)
    with pytest.raises(ValueError, match="one placement per mesh dimension"):
        distribute("w", single_rank_group, [Shard(0), Shard(1)])(tree)
    with pytest.raises(ValueError, match="has no inverse"):
        gather("w").inverse()

    round_trip = distribute("w", single_rank_group, [Shard(1)])
    assert round_trip.inverse() == gather("w", mesh=single_rank_group, placements=[Shard(1)])
    assert torch.equal(round_trip.inverse()(round_trip(tree))["w"], tree["w"])


def test_reduce_gradients_checks_keys(single_rank_group):
    param = distribute_tensor(torch.randn(2, 2), single_rank_group, [Replicate()])

    with pytest.raises(KeyError, match="'missing'"):
        reduce_gradients({"missing": param}, {"w": param})
    with pytest.raises(ValueError, match="gradient of 'w' is a Tensor but the parameter a DTensor"):
        reduce_gradients({"w": torch.zeros(2, 2)}, {"w": param})


def test_fsdp_forward_keeps_tied_head_plain(single_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(tie=True)
    method = peft_method_from_config(
        LoRAConfig(module_name_pattern=["embed_tokens"], embedding_pattern=["embed_tokens"], params=LoRAParameters(r=2, alpha=4.0))
    )
    generator = torch.Generator().manual_seed(6)
    tree = {k: (torch.randn(v.shape, generator=generator) if "lora" in k else v) for k, v in method.inject(state_of(model)).items()}
    adapter = {k: v for k, v in tree.items() if "lora" in k}
    ids = torch.tensor([[3, 8, 1, 30]])
    expected = functional_forward(model, method)(tree, ids).logits

    fully_shard(model, mesh=single_rank_group)
    logits = fsdp_forward(model, method)(adapter, ids).logits

    # The head shares the embedding's weight but is not targeted, so it keeps the base table.
    assert_close(logits, expected, "logits with a tied head")


def _vocab_parallel_worker(rank, world):
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8, 6), nn.Linear(6, 3))
    method = peft_method_from_config(LoRAConfig(module_name_pattern=["0"], embedding_pattern=["0"], params=LoRAParameters(r=2, alpha=4.0)))
    generator = torch.Generator().manual_seed(7)
    tree = {k: (torch.randn(v.shape, generator=generator) if "lora" in k else v) for k, v in method.inject(state_of(model)).items()}
    ids = torch.tensor([[0, 5, 7, 2]])
    expected = functional_forward(model, method)(tree, ids)

    # A row-split table: each rank keeps half of the vocabulary.
    parallelize_module(model, init_device_mesh("cpu", (world,)), {"0": RowwiseParallel(input_layouts=Replicate())})
    sharded = distribute_adapters(method, {**model.state_dict(), **{k: v for k, v in tree.items() if "lora" in k}})
    assert sharded["0.lora_embedding_A"].placements == (Shard(1),)
    assert_close(functional_forward(model, method)(sharded, ids), expected, "logits of a vocabulary-parallel table")


def test_vocab_parallel_embedding_matches_single_process():
    run_workers(_vocab_parallel_worker, 2)


def test_saving_dtensors_is_rejected_before_writing(single_rank_group, tmp_path):
    from ftpeft.io import save_adapter

    tree = {"w": distribute_tensor(torch.randn(2, 2), single_rank_group, [Replicate()])}

    with pytest.raises(TypeError, match=r"Cannot write '.*state': tensor 'w' is a DTensor"):
        save_state(tmp_path / "state", tree)
    with pytest.raises(TypeError, match=r"Cannot write '.*adapter': tensor 'w' is a DTensor"):
        save_adapter(tmp_path / "adapter", lora(["up"]).config, tree)
    assert not (tmp_path / "state").exists()
    assert not (tmp_path / "adapter").exists()


def test_functional_forward_rejects_fully_shard(single_rank_group):
    from torch.distributed.fsdp import fully_shard

    model = TwoLayerMLP()
    fully_shard(model, mesh=single_rank_group)

    with pytest.raises(TypeError, match="TwoLayerMLP is wrapped by fully_shard.*fsdp_forward"):
        functional_forward(model, lora(["up"]))


def test_fsdp_forward_needs_fully_shard():
    with pytest.raises(TypeError, match="no module of TwoLayerMLP is an FSDPModule"):
        fsdp_forward(TwoLayerMLP(), lora(["up"]))



# --- the ftpeft merge command with several workers, and the example scripts of the docs ---------------------


def _write_adapter_folder(root: Path):
    from ftpeft.io import save_adapter

    method, adapter = _write_source(root / "base")
    save_adapter(root / "adapter", method.config, adapter)
    return method, adapter


def test_cli_merge_with_workers_matches_one_worker(tmp_path, capsys):
    from ftpeft.cli import main

    _write_adapter_folder(tmp_path)
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")

    assert main(["merge", base, adapter, str(tmp_path / "one"), "--shard-size", "400B"]) == 0
    for worker in ("1", "0"):
        assert main(["merge", base, adapter, str(tmp_path / "two"), "--shard-size", "400B", "--workers", "2", "--worker", worker]) == 0

    assert_same_checkpoint(tmp_path / "two", tmp_path / "one")
    output = capsys.readouterr().out
    assert "worker 1 of 2: wrote its shards" in output
    assert "with 2 workers" in output


def test_cli_workers_with_other_adapters_fail(tmp_path, capsys):
    from ftpeft.cli import main
    from ftpeft.io import save_adapter

    method, adapter = _write_adapter_folder(tmp_path)
    save_adapter(tmp_path / "other", method.config, {k: v + 1 for k, v in adapter.items()})
    base, out = str(tmp_path / "base"), str(tmp_path / "out")

    assert main(["merge", base, str(tmp_path / "other"), out, "--workers", "2", "--worker", "1"]) == 0
    assert main(["merge", base, str(tmp_path / "adapter"), out, "--workers", "2", "--worker", "0", "--timeout", "0.5"]) == 1

    assert "left a marker of another plan or fingerprint" in capsys.readouterr().err
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_cli_workers_under_torchrun_rejected(tmp_path, capsys, monkeypatch):
    from ftpeft.cli import main

    _write_adapter_folder(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "out"), "--workers", "2", "--worker", "0"]) == 1
    assert "under torchrun, leave out --workers and --worker" in capsys.readouterr().err


def test_cli_merge_rejects_bad_worker(tmp_path, capsys):
    from ftpeft.cli import main

    _write_adapter_folder(tmp_path)
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")

    assert main(["merge", base, adapter, str(tmp_path / "out"), "--workers", "2", "--worker", "2"]) == 1
    assert "--workers 2 needs --worker K with 0 <= K < 2, got 2." in capsys.readouterr().err
    assert main(["merge", base, adapter, str(tmp_path / "out"), "--worker", "1"]) == 1
    assert "--worker needs --workers N." in capsys.readouterr().err


def torchrun(nproc: int, *command: str, cwd: Path) -> str:
    """Run ``torchrun`` on 127.0.0.1 and return its standard output; fail the test with its output on error."""
    import subprocess
    import sys

    arguments = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={free_port()}", *command]
    result = subprocess.run(arguments, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.distributed_slow
def test_cli_merge_under_torchrun(tmp_path):
    _write_adapter_folder(tmp_path)
    from ftpeft.cli import main

    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "one"), "--shard-size", "400B"]) == 0

    output = torchrun(2, "-m", "ftpeft.cli", "merge", "base", "adapter", "four", "--shard-size", "400B", cwd=tmp_path)

    assert "with 2 workers" in output
    assert_same_checkpoint(tmp_path / "four", tmp_path / "one")


EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.mark.distributed_slow
@pytest.mark.parametrize("script", ["fsdp_lora.py", "tensor_parallel_lora.py"])
def test_docs_example_script_runs(tmp_path, script):
    output = torchrun(2, str(EXAMPLES / script), str(tmp_path / "out"), cwd=tmp_path)

    assert "step 4: loss" in output
    merged = load_state(tmp_path / "out" / "merged")
    assert set(merged) == set(load_state(tmp_path / "out" / "base"))
    if script == "fsdp_lora.py":
        from ftpeft.io import load_adapter

        config, adapter = load_adapter(tmp_path / "out" / "adapter")
        expected = peft_method_from_config(config).merge({**load_state(tmp_path / "out" / "base"), **adapter})
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0)

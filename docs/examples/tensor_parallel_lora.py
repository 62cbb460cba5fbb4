"""Train LoRA adapters on a Llama split by tensor parallelism, then merge shard-local.

Run on one machine with two CPU processes:

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29512 tensor_parallel_lora.py OUT_DIR

The script writes a small random Llama checkpoint to OUT_DIR/base first;
point BASE at your own checkpoint directory instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import ftpeft
from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, split_trainable
from ftpeft.distributed import distribute, gather, reduce_gradients, save_gathered
from ftpeft.io import load_state, save_state
from ftpeft.maps import Drop

CONFIG = transformers.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
)


def tensor_parallel_plan(num_layers: int) -> dict:
    """Megatron-style: q, k, v, gate and up split by output rows; o and down by input columns."""
    plan = {}
    for layer in range(num_layers):
        prefix = f"model.layers.{layer}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[prefix + name] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[prefix + name] = RowwiseParallel()
    return plan


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    base = out / "base"
    if rank == 0 and not base.exists():
        torch.manual_seed(0)
        save_state(base, transformers.LlamaForCausalLM(CONFIG).state_dict())
    dist.barrier()

    # The module keeps meta parameters: functional_forward takes every weight from the tree.
    with ftpeft.parameters_on_meta():
        model = transformers.LlamaForCausalLM(CONFIG)
    parallelize_module(model, mesh, tensor_parallel_plan(CONFIG.num_hidden_layers))
    placements = {k: v.placements for k, v in model.state_dict().items() if isinstance(v, DTensor)}

    # Load each split weight as a DTensor with the placements parallelize_module gave it.
    load = distribute(sorted(placements), mesh, lambda key, spec: placements[key])
    tree = load_state(base, load, passthrough=True)

    method = peft_method_from_config(LoRAConfig(module_name_pattern=r".*\.(q_proj|o_proj)", params=LoRAParameters(r=4, alpha=8)))
    tree = method.inject(tree, generator=torch.Generator().manual_seed(0))
    if rank == 0:
        for key in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"):
            print(f"{key}: lora_A {tree[key + '.lora_A'].placements}, lora_B {tree[key + '.lora_B'].placements}")

    trainable, frozen = split_trainable(method, tree)
    trainable = {k: v.detach().requires_grad_() for k, v in trainable.items()}
    forward = functional_forward(model, method)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for step in range(5):
        loss = forward((trainable, frozen), input_ids=ids, labels=ids).loss
        grads = reduce_gradients(dict(zip(trainable, torch.autograd.grad(loss, list(trainable.values())))), trainable)
        trainable = {k: (v - 0.05 * grads[k]).detach().requires_grad_() for k, v in trainable.items()}
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")

    export = method.merge_map() >> Drop(sorted(trainable)) >> gather(pattern=".*")
    save_gathered(out / "merged", {**frozen, **{k: v.detach() for k, v in trainable.items()}}, export)
    if rank == 0:
        print(f"wrote {out / 'merged'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

"""Train LoRA adapters on a Llama sharded by FSDP2, then merge and export it.

Run on one machine with two CPU processes:

    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29511 fsdp_lora.py OUT_DIR

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
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard

import ftpeft
from ftpeft import LoRAConfig, LoRAParameters, peft_method_from_config, spec_of, split_trainable
from ftpeft.distributed import distribute, distribute_adapters, fsdp_forward, gather, reduce_gradients, save_gathered
from ftpeft.io import load_state, save_adapter, save_state
from ftpeft.maps import Drop

CONFIG = transformers.LlamaConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
)


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

    # Plan on a model whose parameters are on the meta device, before any sharding.
    with ftpeft.parameters_on_meta():
        model = transformers.LlamaForCausalLM(CONFIG)
    config = LoRAConfig(module_name_pattern=r".*\.(q_proj|v_proj)", params=LoRAParameters(r=4, alpha=8))
    method = peft_method_from_config(config)
    print(f"rank {rank}: planned {len(method.adapter_keys(spec_of(model)))} adapter leaves")

    # The user's own sharding code: a frozen base, one FSDP unit per decoder layer.
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    # Load the checkpoint as DTensors with FSDP2's layout and hand them to the module.
    sharded = load_state(base, distribute(pattern=".*", mesh=mesh, placements=[Shard(0)]))
    model.load_state_dict(sharded, assign=True)

    # FSDP2 runs modules on gathered plain weights, so the adapters are plain tensors on every rank.
    tree = method.inject(sharded, generator=torch.Generator().manual_seed(0))
    adapters, _ = split_trainable(method, tree)
    adapters = {k: v.requires_grad_() for k, v in gather(pattern=".*")(adapters).items()}
    optimizer = torch.optim.AdamW(list(adapters.values()), lr=1e-2)
    forward = fsdp_forward(model, method)

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))
    rows = len(ids) // world
    local = ids[rank * rows : (rank + 1) * rows]
    for step in range(5):
        loss = forward(adapters, input_ids=local, labels=local).loss
        grads = dict(zip(adapters, torch.autograd.grad(loss, list(adapters.values()))))
        for key, grad in reduce_gradients(grads, adapters).items():
            adapters[key].grad = grad
        optimizer.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0:
            print(f"step {step}: loss {mean.item() / world:.4f}")

    if rank == 0:
        save_adapter(out / "adapter", config, {k: v.detach() for k, v in adapters.items()})

    # Merge shard-local into the FSDP2-sharded weights, then write one checkpoint from rank 0.
    merged_tree = distribute_adapters(method, {**model.state_dict(), **{k: v.detach() for k, v in adapters.items()}})
    export = method.merge_map() >> Drop(sorted(adapters)) >> gather(pattern=".*")
    save_gathered(out / "merged", merged_tree, export)
    if rank == 0:
        print(f"wrote {out / 'adapter'} and {out / 'merged'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

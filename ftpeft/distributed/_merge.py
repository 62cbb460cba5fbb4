"""LoRA merge on the local shards of DTensors, with the plain-tensor merge."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..methods.lora import merge_weight

__all__ = ["merge_local"]


def _local_layout(weight: DTensor, lora_a: DTensor, lora_b: DTensor, transposed: bool) -> bool:
    """Return whether, on every mesh dimension, each rank's shards of W, A and B form their own LoRA merge."""
    if weight.ndim != 2 or not (weight.device_mesh == lora_a.device_mesh == lora_b.device_mesh):
        return False
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    for placement_w, placement_a, placement_b in zip(weight.placements, lora_a.placements, lora_b.placements):
        layout = (placement_w, placement_a, placement_b)
        rows = (Shard(out_dim), Replicate(), Shard(0))
        columns = (Shard(in_dim), Shard(1), Replicate())
        replicated = (Replicate(), Replicate(), Replicate())
        if layout not in (rows, columns, replicated):
            return False
    return True


def merge_local(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, transposed: bool, sign: int
) -> DTensor | None:
    """Return the merged DTensor computed by ``merge_weight`` on each rank's shards, or None when that does not apply.

    It applies to DTensors whose placements follow ``lora_placements`` for a
    2-D weight. There each rank's shards of ``W``, ``A`` and ``B`` are a
    complete LoRA merge of their own, so the plain blocked merge runs on the
    local tensors, with no communication and no DTensor dispatch per op.
    """
    if not all(isinstance(value, DTensor) for value in (weight, lora_a, lora_b)):
        return None
    if not _local_layout(weight, lora_a, lora_b, transposed):
        return None
    local = merge_weight(weight.to_local(), lora_a.to_local(), lora_b.to_local(), scale, transposed=transposed, sign=sign)
    return DTensor.from_local(local, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride())

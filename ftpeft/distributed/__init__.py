"""ftpeft on sharded models: DTensor trees, FSDP2, placement maps and checkpoint conversion with N workers.

Importing this module imports ``torch.distributed.tensor`` and FSDP2; the
rest of ftpeft does not import them.
"""

from __future__ import annotations

from ..maps import shard
from ._convert import convert_checkpoint, save_gathered
from ._fsdp import fsdp_forward
from ._maps import Distribute, Gather, distribute, gather
from ._placement import PlacementRule, distribute_adapters, lora_placements, reduce_gradients

__all__ = [
    "Distribute",
    "Gather",
    "PlacementRule",
    "convert_checkpoint",
    "distribute",
    "distribute_adapters",
    "fsdp_forward",
    "gather",
    "lora_placements",
    "reduce_gradients",
    "save_gathered",
    "shard",
]

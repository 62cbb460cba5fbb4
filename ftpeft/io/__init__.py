"""Checkpoint input and output: streamed, sharded safetensors through maps."""

from __future__ import annotations

from ._format import CheckpointError
from ._state import checkpoint_spec, iter_state, load_state, save_state

__all__ = ["CheckpointError", "checkpoint_spec", "iter_state", "load_state", "save_state"]

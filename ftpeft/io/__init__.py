"""Checkpoint input and output: streamed, sharded safetensors through maps."""

from __future__ import annotations

from ._format import CheckpointError
from ._merge import AdapterMerge
from ._state import checkpoint_spec, iter_state, load_state, save_state
from .adapter import is_ftpeft_adapter, load_adapter, save_adapter
from .hf_peft import (
    FtpeftWarning,
    HFPeftKeys,
    RemoveSegment,
    hf_peft_key_map,
    load_hf_peft_adapter,
    read_hf_peft_config,
    replace_prefix,
    save_hf_peft_adapter,
)

__all__ = [
    "AdapterMerge",
    "CheckpointError",
    "FtpeftWarning",
    "HFPeftKeys",
    "RemoveSegment",
    "checkpoint_spec",
    "hf_peft_key_map",
    "is_ftpeft_adapter",
    "iter_state",
    "load_adapter",
    "load_hf_peft_adapter",
    "load_state",
    "read_hf_peft_config",
    "replace_prefix",
    "save_adapter",
    "save_hf_peft_adapter",
    "save_state",
]

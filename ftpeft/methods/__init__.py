"""PEFT methods: configs, the method interface and its implementations."""

from __future__ import annotations

from .base import PeftMethod, WeightAdapter, split_trainable
from .config import (
    AnyPeftConfig,
    FullTuneConfig,
    LoRAConfig,
    LoRAParameters,
    PeftStackConfig,
    config_from_json,
)
from .full_tune import FullTune
from .lora import LoRA
from .stack import PeftStack

__all__ = [
    "AnyPeftConfig",
    "FullTune",
    "FullTuneConfig",
    "LoRA",
    "LoRAConfig",
    "LoRAParameters",
    "PeftMethod",
    "PeftStack",
    "PeftStackConfig",
    "WeightAdapter",
    "config_from_json",
    "peft_method_from_config",
    "split_trainable",
]


def peft_method_from_config(config: LoRAConfig | FullTuneConfig | PeftStackConfig) -> PeftMethod:
    """Build the method that a config describes.

    Example:
        >>> method = peft_method_from_config(LoRAConfig(module_name_pattern=["q_proj", "v_proj"]))
    """
    if isinstance(config, LoRAConfig):
        return LoRA(config)
    if isinstance(config, FullTuneConfig):
        return FullTune(config)
    if isinstance(config, PeftStackConfig):
        return PeftStack(config, [peft_method_from_config(member) for member in config.methods])
    raise TypeError(
        f"peft_method_from_config expects a LoRAConfig, FullTuneConfig or PeftStackConfig, got {type(config).__name__}. "
        "Parse JSON with config_from_json first."
    )

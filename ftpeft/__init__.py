"""ftpeft: parameter-efficient fine-tuning for PyTorch as pure functions over parameter trees."""

from __future__ import annotations

from . import arithmetic, io, maps, multi
from .forward import functional_forward
from .meta import parameters_on_meta
from .methods import (
    AnyPeftConfig,
    FullTune,
    FullTuneConfig,
    LoRA,
    LoRAConfig,
    LoRAParameters,
    PeftMethod,
    PeftStack,
    PeftStackConfig,
    WeightAdapter,
    config_from_json,
    peft_method_from_config,
    split_trainable,
)
from .tree import TensorSpec, Tree, combine, select, spec_of, split

__version__ = "0.1.0"

__all__ = [
    "AnyPeftConfig",
    "arithmetic",
    "io",
    "maps",
    "multi",
    "FullTune",
    "FullTuneConfig",
    "LoRA",
    "LoRAConfig",
    "LoRAParameters",
    "PeftMethod",
    "PeftStack",
    "PeftStackConfig",
    "TensorSpec",
    "Tree",
    "WeightAdapter",
    "combine",
    "config_from_json",
    "functional_forward",
    "parameters_on_meta",
    "peft_method_from_config",
    "select",
    "spec_of",
    "split",
    "split_trainable",
]

"""ftpeft's own adapter folder: ``ftpeft_config.json`` + ``adapter.safetensors``, keys as ftpeft names them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..methods.config import config_from_json
from ..tree import Tree
from ._format import read_header, read_tensor
from ._state import atomic_write_file, atomic_write_text, reject_dtensors

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "is_ftpeft_adapter", "load_adapter", "save_adapter"]

ADAPTER_CONFIG_NAME = "ftpeft_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"


def save_adapter(directory: str | os.PathLike, config, adapter: Mapping[str, torch.Tensor]) -> Path:
    """Write a method config (as JSON) and its adapter leaves to a folder, each file atomically."""
    directory = Path(directory)
    reject_dtensors(adapter, directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in sorted(adapter.items())}
    atomic_write_file(directory / ADAPTER_WEIGHTS_NAME, tensors, {"format": "pt"})
    atomic_write_text(directory / ADAPTER_CONFIG_NAME, config.model_dump_json(indent=2) + "\n")
    return directory


def is_ftpeft_adapter(directory: str | os.PathLike) -> bool:
    """Return whether a folder contains an ftpeft adapter."""
    return (Path(directory) / ADAPTER_CONFIG_NAME).is_file()


def load_adapter(directory: str | os.PathLike):
    """Read a folder written by ``save_adapter``; return ``(config, adapter)``.

    Raises:
        FileNotFoundError: naming the missing file.
        pydantic.ValidationError: naming the invalid config field.
    """
    directory = Path(directory)
    config_file = directory / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(config_file)!r} does not exist; an ftpeft adapter folder contains {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}.")
    config = config_from_json(config_file.read_text())
    header = read_header(directory / ADAPTER_WEIGHTS_NAME)
    with open(header.file, "rb") as handle:
        adapter: Tree = {key: read_tensor(entry, handle) for key, entry in header.entries.items()}
    return config, adapter

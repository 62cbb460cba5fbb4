"""Full fine-tuning of matched modules: their leaves become trainable as they are."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..maps import StateMap, identity
from ..tree import TensorSpec, Tree, module_paths
from ._patterns import match_modules
from .base import PeftMethod, WeightAdapter
from .config import FullTuneConfig

__all__ = ["FullTune"]


class FullTune(PeftMethod):
    """Train every floating-point leaf of the matched modules, recursively.

    The pattern is matched against every module path, containers and the
    root (``""``) included, so ``layers\\.0`` trains all of layer 0. The
    method adds no leaves: inject, merge and unmerge return new dicts with
    the same leaves.

    NOTE: floating-point buffers that ``state_dict()`` lists (for example
    BatchNorm running statistics) count as leaves here and are made
    trainable with the parameters around them.
    """

    def __init__(self, config: FullTuneConfig):
        self.config = config

    def targets(self, tree: Mapping[str, Any]) -> list[str]:
        """Return the matched module paths.

        Raises:
            ValueError: if a pattern matches no module path in ``tree``.
        """
        return match_modules(self.config.module_name_pattern, module_paths(tree), method="FullTune")

    def inject(self, params: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tree:
        self.targets(params)
        return dict(params)

    def adapter_keys(self, tree: Mapping[str, Any]) -> set[str]:
        return set()

    def trainable_keys(self, tree: Mapping[str, Any]) -> set[str]:
        targets = self.targets(tree)
        if "" in targets:
            prefixes: tuple[str, ...] = ("",)
        else:
            prefixes = tuple(f"{module}." for module in targets)
        return {
            key
            for key, leaf in tree.items()
            if key.startswith(prefixes) and TensorSpec.of(leaf).dtype.is_floating_point
        }

    def merge(self, tree: Mapping[str, Any]) -> Tree:
        return dict(tree)

    def unmerge(self, merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> Tree:
        if adapter:
            raise ValueError(
                f"FullTune has no adapter leaves, but the adapter contains {', '.join(sorted(adapter)[:5])}. "
                "Its trained values live in the merged tree itself."
            )
        return dict(merged)

    def merge_map(self) -> StateMap:
        return identity

    def bind_forward(self, spec: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, list[WeightAdapter]]]:
        self.targets(spec)
        return lambda tree: {}

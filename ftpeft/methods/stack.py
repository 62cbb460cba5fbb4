"""A stack of methods: injected in order, merged in reverse order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..maps import StateMap, compose
from ..tree import Tree, select
from .base import PeftMethod, WeightAdapter
from .config import PeftStackConfig

__all__ = ["PeftStack"]


class PeftStack(PeftMethod):
    """Several methods over one tree, such as LoRA on attention plus FullTune of the norms.

    Member ``i`` receives the tree that members ``0 .. i-1`` injected. Two members
    may not create the same key; a key both make trainable (LoRA leaves that a
    FullTune pattern also covers) is simply trainable.
    """

    def __init__(self, config: PeftStackConfig, methods: Sequence[PeftMethod]):
        self.config = config
        self.methods = list(methods)

    def inject(self, params: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tree:
        tree: Tree = dict(params)
        for index, method in enumerate(self.methods):
            clash = sorted(method.adapter_keys(tree) & tree.keys())
            if clash:
                raise ValueError(
                    f"Stack member {index} ({method.config.kind}) would create key(s) {', '.join(clash[:4])} "
                    "that the tree already contains, so two members adapt the same module the same way. "
                    "Make the members' patterns disjoint."
                )
            tree = method.inject(tree, generator=generator)
        return tree

    def adapter_keys(self, tree: Mapping[str, Any]) -> set[str]:
        keys: set[str] = set()
        for method in self.methods:
            keys |= method.adapter_keys(tree)
        return keys

    def trainable_keys(self, tree: Mapping[str, Any]) -> set[str]:
        keys: set[str] = set()
        for method in self.methods:
            keys |= method.trainable_keys(tree)
        return keys

    def merge(self, tree: Mapping[str, Any]) -> Tree:
        merged: Tree = dict(tree)
        for method in reversed(self.methods):
            merged = method.merge(merged)
        return merged

    def unmerge(self, merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> Tree:
        owned = self.adapter_keys(merged)
        extra = sorted(set(adapter) - owned)
        if extra:
            raise ValueError(f"The adapter contains key(s) {', '.join(extra[:5])} that no stack member creates.")
        tree: Tree = dict(merged)
        for method in self.methods:
            own_keys = method.adapter_keys(tree) & set(adapter)
            tree = method.unmerge(tree, select(adapter, own_keys))
        return tree

    def check_model(self, model: torch.nn.Module) -> None:
        for method in self.methods:
            method.check_model(model)

    def merge_map(self) -> StateMap:
        return compose(*(method.merge_map() for method in reversed(self.methods)))

    def bind_forward(self, spec: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, list[WeightAdapter]]]:
        # Targets depend on base weight keys only, so every member plans on the same spec.
        binders = [method.bind_forward(spec) for method in self.methods]

        def bind(tree: Mapping[str, Any]) -> dict[str, list[WeightAdapter]]:
            adapters: dict[str, list[WeightAdapter]] = {}
            for binder in binders:
                for key, chain in binder(tree).items():
                    adapters[key] = adapters.get(key, []) + chain
            return adapters

        return bind


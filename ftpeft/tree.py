"""Flat parameter trees: specs, key helpers, splitting and combining.

A tree is a flat ``dict[str, Tensor]`` with dotted keys, as
``nn.Module.state_dict()`` returns it (``layers.0.q_proj.weight``). A spec
tree has the same keys with ``TensorSpec`` leaves, so every method can
plan on shapes alone. Leaves are handled through optree, so a tree may also
hold specs, meta tensors or functorch-wrapped tensors without special cases.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import optree
import torch
from torch import nn

__all__ = [
    "Leaf",
    "Tree",
    "TensorSpec",
    "combine",
    "is_spec",
    "module_path",
    "module_paths",
    "param_name",
    "select",
    "spec_of",
    "split",
]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor, without its data.

    A spec replaces a tensor wherever a method only needs to plan which
    modules to target and which adapter leaves to create with what shape.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    #: True for a leaf that a method's ``inject`` creates, so a loader does
    #: not look for it in a base checkpoint.
    adapter: bool = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def of(cls, value: torch.Tensor | TensorSpec) -> TensorSpec:
        """Return the spec of a tensor (any device, `meta` included) or a spec."""
        if isinstance(value, TensorSpec):
            return value
        return cls(tuple(value.shape), value.dtype, value.device)

    def __repr__(self) -> str:
        flag = ", adapter=True" if self.adapter else ""
        return f"TensorSpec({self.shape}, {self.dtype}, {self.device}{flag})"


Leaf = TypeVar("Leaf", torch.Tensor, TensorSpec)
Tree = dict[str, Any]


def is_spec(tree: Mapping[str, Any]) -> bool:
    """Return whether the leaves of ``tree`` are specs rather than tensors.

    Raises:
        TypeError: if the tree mixes specs and tensors.
    """
    kinds = {isinstance(leaf, TensorSpec) for leaf in tree.values()}
    if kinds == {True, False}:
        specs = sorted(k for k, v in tree.items() if isinstance(v, TensorSpec))[:3]
        raise TypeError(
            f"The tree mixes TensorSpec leaves ({', '.join(specs)}, ...) with tensors. "
            "Pass either spec_of(...) of the whole tree or the tensors themselves."
        )
    return kinds == {True}


def spec_of(module_or_tree: nn.Module | Mapping[str, Any]) -> dict[str, TensorSpec]:
    """Return the spec of every leaf of a module or tree, without reading data.

    For a module the keys are those of ``module.state_dict()``: parameters and
    persistent buffers, tied weights listed under each of their names. Only
    shapes, dtypes and devices are read, so a module built on the ``meta``
    device works.

    Example:
        >>> with torch.device("meta"):
        ...     layer = nn.Linear(4, 3)
        >>> spec_of(layer)["weight"]
        TensorSpec((3, 4), torch.float32, meta)
    """
    if isinstance(module_or_tree, nn.Module):
        # keep_vars avoids detach(), which is cheap anyway but not needed here.
        tree: Mapping[str, Any] = module_or_tree.state_dict(keep_vars=True)
    elif isinstance(module_or_tree, Mapping):
        tree = module_or_tree
    else:
        raise TypeError(
            f"spec_of expects an nn.Module or a mapping of tensors, got {type(module_or_tree).__name__}."
        )
    return optree.tree_map(TensorSpec.of, dict(tree), none_is_leaf=False)


def module_path(key: str) -> str:
    """Return the module part of a leaf key: ``"a.b.weight"`` -> ``"a.b"``."""
    return key.rpartition(".")[0]


def param_name(key: str) -> str:
    """Return the leaf name of a key: ``"a.b.weight"`` -> ``"weight"``."""
    return key.rpartition(".")[2]


def module_paths(keys: Iterable[str]) -> list[str]:
    """Return every module path that owns a key, containers included, sorted.

    ``["a.b.weight"]`` gives ``["", "a", "a.b"]``; the root module is ``""``.
    """
    paths: set[str] = {""}
    for key in keys:
        parts = key.split(".")[:-1]
        for end in range(1, len(parts) + 1):
            paths.add(".".join(parts[:end]))
    return sorted(paths)


def select(tree: Mapping[str, Any], keys: Iterable[str]) -> Tree:
    """Return a new tree with only ``keys``, in the tree's own order.

    Raises:
        KeyError: naming the keys that the tree does not have.
    """
    return split(tree, keys)[0]


def split(tree: Mapping[str, Any], keys: Iterable[str]) -> tuple[Tree, Tree]:
    """Split a tree into ``(tree restricted to keys, everything else)``.

    Raises:
        KeyError: naming the keys that the tree does not have.
    """
    requested = set(keys)
    missing = requested - tree.keys()
    if missing:
        raise KeyError(f"The tree has no key(s) {_preview(missing)}.")
    chosen = {k: v for k, v in tree.items() if k in requested}
    rest = {k: v for k, v in tree.items() if k not in requested}
    return chosen, rest


def combine(*trees: Mapping[str, Any]) -> Tree:
    """Combine disjoint trees into one new tree.

    Raises:
        ValueError: naming the keys that appear in more than one tree.
    """
    combined: Tree = {}
    for tree in trees:
        overlap = combined.keys() & tree.keys()
        if overlap:
            raise ValueError(
                f"Cannot combine trees that share key(s) {_preview(overlap)}; "
                "each key must come from exactly one tree (for example split a tree "
                "with split_trainable and pass both halves)."
            )
        combined.update(tree)
    return combined


def _preview(keys: Iterable[str], limit: int = 5) -> str:
    ordered = sorted(keys)
    listed = ", ".join(repr(k) for k in ordered[:limit])
    if len(ordered) > limit:
        listed += f" and {len(ordered) - limit} more"
    return listed

"""Invertible state maps over flat trees, and their algebra.

A map is a pure function from one flat tree to another that declares its
dependency groups (which input keys produce which output keys) without
touching data, runs on tensors or on specs, and has an inverse::

    to_fused = Concatenate(("q.weight", "k.weight", "v.weight"), "qkv.weight", sizes=(8, 4, 4))
    pipeline = StripPrefix("_orig_mod") >> to_fused
    fused = pipeline(tree)
    assert pipeline.inverse()(fused).keys() == tree.keys()
"""

from __future__ import annotations

from ._core import Compose, Group, Identity, Parallel, Plan, StateMap, check_invertible, compose, identity
from ._keys import AddPrefix, Drop, RegexRename, Rename, SelectScope, StripPrefix, regex_rename, rename
from ._shapes import Cast, Chunk, Concatenate, Reshape, Squeeze, Stack, Transpose, Unsqueeze, Unstack, is_widening
from ._shard import Shard, shard

__all__ = [
    "AddPrefix",
    "Cast",
    "Chunk",
    "Compose",
    "Concatenate",
    "Drop",
    "Group",
    "Identity",
    "Parallel",
    "Plan",
    "RegexRename",
    "Rename",
    "Reshape",
    "SelectScope",
    "Shard",
    "Squeeze",
    "Stack",
    "StateMap",
    "StripPrefix",
    "Transpose",
    "Unsqueeze",
    "Unstack",
    "check_invertible",
    "compose",
    "identity",
    "is_widening",
    "regex_rename",
    "rename",
    "shard",
]

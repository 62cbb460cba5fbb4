"""Splitting a map's groups across workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..tree import TensorSpec
from ._core import Group, Plan, StateMap

__all__ = ["Shard", "shard"]


@dataclasses.dataclass(frozen=True)
class Shard(StateMap):
    """Keep the groups of ``inner`` that belong to worker ``index`` of ``count``.

    Groups are dealt round robin in the order ``inner`` plans them, so every
    worker that plans the same spec gets a disjoint share and the shares
    cover every group. The other groups' inputs are consumed: they are
    neither read from storage nor passed through.

    The inverse applies ``inner.inverse()`` to what this worker produced.
    """

    inner: StateMap
    count: int
    index: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"Shard needs count >= 1 and 0 <= index < count, got count={self.count}, index={self.index}.")

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.inner.exact

    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        return self.inner.reads(spec)

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        return self._own(self.inner.plan(spec)).groups

    def plan(self, spec: Mapping[str, Any], *, passthrough: bool = False) -> Plan:
        return self._own(self.inner.plan(spec, passthrough=passthrough))

    def _own(self, plan: Plan) -> Plan:
        return plan.subset(group for position, group in enumerate(plan.groups) if position % self.count == self.index)

    def inverse(self) -> StateMap:
        return _ShardInverse(self.inner.inverse(), self.count, self.index)


@dataclasses.dataclass(frozen=True)
class _ShardInverse(StateMap):
    """The inverse of a ``Shard``: the inner inverse, on one worker's output."""

    inner: StateMap
    count: int
    index: int

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return self.inner.exact

    def reads(self, spec):
        return self.inner.reads(spec)

    def _plan(self, spec):
        return list(self.inner.plan(spec).groups)

    def plan(self, spec, *, passthrough: bool = False) -> Plan:
        return self.inner.plan(spec, passthrough=passthrough)

    def inverse(self) -> StateMap:
        return Shard(self.inner.inverse(), self.count, self.index)


def shard(map: StateMap, count: int, index: int) -> Shard:
    """Return the part of ``map`` that worker ``index`` of ``count`` runs: its groups, dealt round robin.

    Every worker that plans the same spec gets a disjoint share, and the
    shares cover every group, so ``count`` workers together run the whole
    map. ``ftpeft.distributed.convert_checkpoint`` uses it to convert a
    checkpoint with several workers.

    Raises:
        ValueError: unless ``count >= 1`` and ``0 <= index < count``.
    """
    return Shard(map, count, index)

"""State maps: planned, invertible functions over flat trees, and their algebra."""

from __future__ import annotations

import abc
import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..tree import TensorSpec, Tree, is_spec

__all__ = ["Group", "Plan", "StateMap", "Identity", "Compose", "Parallel", "identity", "check_invertible"]

GroupFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Group:
    """One dependency group: the input keys that together produce the output keys.

    ``fn`` takes exactly the inputs and returns exactly the outputs. A
    streaming loader reads a group's inputs, runs ``fn`` and drops the inputs
    before the next group.
    """

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: GroupFn = dataclasses.field(compare=False, repr=False)
    #: True for a group that only passes an unread key through unchanged.
    passthrough: bool = dataclasses.field(default=False, compare=False, repr=False)


def _keep(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(tensors)


def identity_group(key: str, *, passthrough: bool = False) -> Group:
    return Group((key,), (key,), _keep, passthrough)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A map planned for one spec: its groups, in order, and the spec it produces."""

    groups: tuple[Group, ...]
    input_spec: dict[str, TensorSpec] = dataclasses.field(compare=False)
    output_spec: dict[str, TensorSpec] = dataclasses.field(compare=False)

    def subset(self, groups: Iterable[Group]) -> Plan:
        """Return the plan restricted to some of its groups."""
        groups = tuple(groups)
        inputs = {key: self.input_spec[key] for group in groups for key in group.inputs}
        outputs = {key: self.output_spec[key] for group in groups for key in group.outputs}
        return Plan(groups, inputs, outputs)

    @property
    def inputs(self) -> list[str]:
        return [key for group in self.groups for key in group.inputs]

    @property
    def outputs(self) -> list[str]:
        return [key for group in self.groups for key in group.outputs]

    def run(self, tree: Mapping[str, Any]) -> Tree:
        """Apply the planned groups to a tree of tensors, or of specs."""
        missing = [key for key in self.inputs if key not in tree]
        if missing:
            raise KeyError(f"The tree has no key(s) {', '.join(repr(k) for k in missing[:5])} that this map reads.")
        if is_spec(tree):
            return {key: self.output_spec[key] for key in self.outputs}
        result: Tree = {}
        for group in self.groups:
            result.update(run_group(group, {key: tree[key] for key in group.inputs}))
        return result


def run_group(group: Group, inputs: dict[str, Any]) -> dict[str, Any]:
    """Run one group and check that it returned exactly its declared outputs."""
    outputs = group.fn(inputs)
    if set(outputs) != set(group.outputs):
        raise RuntimeError(
            f"A map group declared outputs {group.outputs} but returned {tuple(outputs)}; this is a bug in the map."
        )
    return {key: outputs[key] for key in group.outputs}


def _spec_to_meta(spec: TensorSpec) -> torch.Tensor:
    return torch.empty(spec.shape, dtype=spec.dtype, device="meta")


def plan_groups(groups: Iterable[Group], spec: Mapping[str, TensorSpec]) -> Plan:
    """Build a plan from groups, computing the output spec by running them on meta tensors."""
    groups = tuple(groups)
    produced: dict[str, str] = {}
    output_spec: dict[str, TensorSpec] = {}
    for group in groups:
        for key in group.outputs:
            if key in produced:
                raise ValueError(
                    f"Two map groups both produce key {key!r} (from {produced[key]!r} and {group.inputs[0]!r}). "
                    "Each output key must come from exactly one place; check renames and parallel maps for collisions."
                )
            produced[key] = group.inputs[0] if group.inputs else "<nothing>"
        device = spec[group.inputs[0]].device if group.inputs else torch.device("cpu")
        outputs = run_group(group, {key: _spec_to_meta(spec[key]) for key in group.inputs})
        for key, value in outputs.items():
            output_spec[key] = TensorSpec(tuple(value.shape), value.dtype, device)
    input_spec = {key: spec[key] for group in groups for key in group.inputs}
    return Plan(groups, input_spec, output_spec)


class StateMap(abc.ABC):
    """A pure function over flat trees that declares its dependency groups and has an inverse.

    Maps compose: ``f >> g`` runs ``f`` then ``g``; ``f | g`` runs both on
    disjoint keys; ``f.inverse()`` undoes ``f``. Apply a map with
    ``f(tree)``, on tensors or on specs.
    """

    #: Whether ``f.inverse()(f(x))`` gives back ``x`` bit for bit.
    exact: bool = True

    @abc.abstractmethod
    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        """Return the keys of ``spec`` this map consumes (reads or deliberately drops)."""

    @abc.abstractmethod
    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        """Return the groups over the keys ``reads`` returns; check that they exist."""

    @abc.abstractmethod
    def inverse(self) -> StateMap:
        """Return the map that undoes this one.

        Raises:
            ValueError: if the map has no inverse, saying why.
        """

    def plan(self, spec: Mapping[str, Any], *, passthrough: bool = False) -> Plan:
        """Plan this map for a tree's spec, without touching data.

        Args:
            spec: a spec tree, or any tree (only shapes and dtypes are read).
            passthrough: pass keys that no group reads through unchanged.
                By default such keys raise, so a pipeline that misses a key
                fails loudly.

        Raises:
            ValueError: naming keys that no group reads (without
                ``passthrough``), or output keys that collide.
            KeyError: naming an input key the tree lacks.
        """
        spec = _as_spec(spec)
        groups = list(self._plan(spec))
        read = self.reads(spec)
        unread = [key for key in spec if key not in read]
        if unread and not passthrough:
            _raise_unread(self, unread)
        groups.extend(identity_group(key, passthrough=True) for key in unread)
        return plan_groups(groups, spec)

    def __call__(self, tree: Mapping[str, Any], *, passthrough: bool = False) -> Tree:
        """Apply the map to a tree of tensors or specs and return the new tree."""
        return self.plan(tree, passthrough=passthrough).run(tree)

    def __rshift__(self, other: StateMap) -> StateMap:
        if not isinstance(other, StateMap):
            return NotImplemented
        return compose(self, other)

    def __or__(self, other: StateMap) -> StateMap:
        if not isinstance(other, StateMap):
            return NotImplemented
        return Parallel(_flatten(Parallel, (self, other)))


def select_keys(spec: Mapping[str, Any], keys: Iterable[str], pattern: str | None, what: str) -> list[str]:
    """Return the keys of ``spec`` named in ``keys`` or fullmatching ``pattern``, in ``spec``'s order.

    Raises:
        KeyError: naming a key of ``keys`` that ``spec`` lacks.
    """
    keys = tuple(keys)
    missing = [key for key in keys if key not in spec]
    if missing:
        raise KeyError(f"{what} reads key(s) {', '.join(repr(k) for k in missing[:5])}, which the tree does not have.")
    chosen = set(keys)
    if pattern is not None:
        regex = re.compile(pattern)
        chosen |= {key for key in spec if regex.fullmatch(key)}
    return [key for key in spec if key in chosen]


def _raise_unread(state_map: StateMap, unread: list[str]) -> None:
    raise ValueError(
        f"No group of {state_map!r} reads key(s) {', '.join(repr(k) for k in unread[:5])}"
        f"{f' and {len(unread) - 5} more' if len(unread) > 5 else ''}. Extend the map to cover them, or "
        "pass passthrough=True to keep them unchanged."
    )


def _as_spec(tree: Mapping[str, Any]) -> dict[str, TensorSpec]:
    return {key: TensorSpec.of(value) for key, value in tree.items()}


def _flatten(kind: type, maps: Iterable[StateMap]) -> tuple[StateMap, ...]:
    flat: list[StateMap] = []
    for item in maps:
        if isinstance(item, kind):
            flat.extend(item.maps)  # type: ignore[attr-defined]
        elif not (kind is Compose and isinstance(item, Identity)):
            flat.append(item)
    return tuple(flat)


def compose(*maps: StateMap) -> StateMap:
    """Return the map that applies ``maps`` left to right (what ``f >> g`` builds)."""
    flat = _flatten(Compose, maps)
    if not flat:
        return Identity()
    if len(flat) == 1:
        return flat[0]
    return Compose(flat)


@dataclasses.dataclass(frozen=True)
class Identity(StateMap):
    """The map that returns every key unchanged; ``identity >> f == f``."""

    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        return set(spec)

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        return [identity_group(key) for key in spec]

    def inverse(self) -> StateMap:
        return self


identity = Identity()


@dataclasses.dataclass(frozen=True)
class Compose(StateMap):
    """Maps applied left to right. Build it with ``f >> g``."""

    maps: tuple[StateMap, ...]

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(m.exact for m in self.maps)

    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        return self.maps[0].reads(spec)

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        return list(self.plan_stages(spec, passthrough=False).groups)

    def plan(self, spec: Mapping[str, Any], *, passthrough: bool = False) -> Plan:
        return self.plan_stages(_as_spec(spec), passthrough=passthrough)

    def plan_stages(self, spec: Mapping[str, TensorSpec], *, passthrough: bool) -> Plan:
        """Plan every stage, then fuse groups joined by a key into one group per connected set.

        Each stage passes on the keys it does not read, so ``f >> g`` may
        leave to ``g`` a key that ``f`` does not touch. Without
        ``passthrough``, a key that no stage reads raises.
        """
        plans: list[Plan] = []
        current: Mapping[str, TensorSpec] = spec
        touched = dict.fromkeys(spec, False)
        for stage in self.maps:
            stage_plan = stage.plan(current, passthrough=True)
            plans.append(stage_plan)
            current = stage_plan.output_spec
            next_touched: dict[str, bool] = {}
            for group in stage_plan.groups:
                for key in group.outputs:
                    next_touched[key] = touched[group.inputs[0]] if group.passthrough else True
            touched = next_touched
        untouched = [key for key, was_read in touched.items() if not was_read]
        if untouched and not passthrough:
            _raise_unread(self, untouched)

        # A fused group that only carries an untouched key is still a passthrough
        # group, so an enclosing composition keeps track of what was read.
        fused = []
        for group in _fuse(plans):
            if len(group.outputs) == 1 and not touched[group.outputs[0]]:
                group = dataclasses.replace(group, passthrough=True)
            fused.append(group)
        return plan_groups(fused, spec)

    def inverse(self) -> StateMap:
        return compose(*(m.inverse() for m in reversed(self.maps)))


def _fuse(plans: list[Plan]) -> list[Group]:
    """Fuse the groups of consecutive stage plans into end-to-end groups.

    Groups of neighbouring stages that share a key belong to one connected
    set. Each set becomes one group that reads only first-stage inputs and
    writes only last-stage outputs, so a streaming loader can still run the
    whole pipeline group by group.
    """
    nodes = [(depth, group) for depth, plan in enumerate(plans) for group in plan.groups]
    parent = list(range(len(nodes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    producer: dict[str, int] = {}
    for index, (depth, group) in enumerate(nodes):
        if depth > 0:
            for key in group.inputs:
                parent[find(index)] = find(producer[key])
        for key in group.outputs:
            producer[key] = index

    members: dict[int, list[int]] = {}
    for index in range(len(nodes)):
        members.setdefault(find(index), []).append(index)

    last = len(plans) - 1
    fused: list[Group] = []
    for indices in members.values():
        stages: list[list[Group]] = [[] for _ in plans]
        for index in indices:
            depth, group = nodes[index]
            stages[depth].append(group)
        fused.append(_fused_group(stages, last))
    return fused


def _fused_group(stages: list[list[Group]], last: int) -> Group:
    inputs = tuple(key for group in stages[0] for key in group.inputs)
    outputs = tuple(key for group in stages[last] for key in group.outputs)
    active = [groups for groups in stages if groups]
    if len(active) == 1 and len(active[0]) == 1 and stages[last]:
        return active[0][0]

    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        current = dict(tensors)
        for groups in stages:
            for group in groups:
                produced = run_group(group, {key: current.pop(key) for key in group.inputs})
                current.update(produced)
        return {key: current[key] for key in outputs}

    return Group(inputs, outputs, fn)


@dataclasses.dataclass(frozen=True)
class Parallel(StateMap):
    """Maps applied side by side to disjoint keys. Build it with ``f | g``."""

    maps: tuple[StateMap, ...]

    @property
    def exact(self) -> bool:  # type: ignore[override]
        return all(m.exact for m in self.maps)

    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        return set().union(*(m.reads(spec) for m in self.maps))

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        claimed: dict[str, int] = {}
        for index, member in enumerate(self.maps):
            for key in member.reads(spec):
                if key in claimed:
                    raise ValueError(
                        f"Parallel maps {claimed[key]} and {index} both read key {key!r}; the maps in f | g must "
                        "read disjoint keys. Compose them with >> instead if one should follow the other."
                    )
                claimed[key] = index
        groups: list[Group] = []
        for index, member in enumerate(self.maps):
            own = {key: value for key, value in spec.items() if claimed.get(key) == index}
            groups.extend(member.plan(own).groups)
        return groups

    def inverse(self) -> StateMap:
        return Parallel(tuple(m.inverse() for m in self.maps))


def check_invertible(
    state_map: StateMap,
    tree: Mapping[str, Any],
    *,
    atol: float | None = None,
    rtol: float | None = None,
    passthrough: bool = False,
) -> None:
    """Check that ``state_map.inverse()`` brings ``tree`` back, and raise if not.

    Runs the round trip on the caller's own tree (tensors or specs). Maps
    that claim exactness (``state_map.exact``) are compared bit for bit
    unless a tolerance is given; others use ``torch.testing.assert_close``'s
    defaults for the dtype.

    Raises:
        AssertionError: naming the first key whose presence, shape, dtype or
            value does not come back, with the largest difference.
        ValueError: if the map has no inverse.
    """
    forward = state_map(tree, passthrough=passthrough)
    back = state_map.inverse()(forward, passthrough=passthrough)

    missing = [key for key in tree if key not in back]
    extra = [key for key in back if key not in tree]
    if missing or extra:
        raise AssertionError(
            f"Round trip through {state_map!r} changed the keys: lost {missing[:5]}, gained {extra[:5]}."
        )
    for key, original in tree.items():
        returned = back[key]
        if tuple(original.shape) != tuple(returned.shape) or original.dtype != returned.dtype:
            raise AssertionError(
                f"Round trip changed {key!r}: shape {tuple(original.shape)} -> {tuple(returned.shape)}, "
                f"dtype {original.dtype} -> {returned.dtype}."
            )
        if isinstance(original, TensorSpec):
            continue
        bit_exact = state_map.exact and atol is None and rtol is None
        if bit_exact:
            same = torch.equal(original, returned) or (
                original.is_floating_point() and torch.equal(torch.isnan(original), torch.isnan(returned))
                and torch.equal(original.nan_to_num(), returned.nan_to_num())
            )
            if not same:
                difference = _max_difference(original, returned)
                raise AssertionError(f"Round trip changed the values of {key!r} (largest difference {difference}); expected bit-exact.")
        else:
            try:
                torch.testing.assert_close(returned, original, atol=atol, rtol=rtol)
            except AssertionError as error:
                difference = _max_difference(original, returned)
                raise AssertionError(f"Round trip changed the values of {key!r} (largest difference {difference}).\n{error}") from None


def _max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()

"""Maps between plain tensors and DTensors: ``distribute`` and its inverse ``gather``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard, distribute_tensor

from ..maps import Group, StateMap
from ..maps._core import select_keys
from ..tree import TensorSpec

__all__ = ["Distribute", "Gather", "distribute", "gather"]

#: Placements for the keys of a ``distribute`` map: one sequence for every key,
#: or a callable ``placements(key, spec)`` that returns them per key.
Placements = Sequence[Placement] | Callable[[str, TensorSpec], Sequence[Placement]]


def _as_keys(keys: str | Iterable[str]) -> tuple[str, ...]:
    return (keys,) if isinstance(keys, str) else tuple(keys)


@dataclasses.dataclass(frozen=True)
class Distribute(StateMap):
    """Turn full tensors into DTensors on ``mesh`` with ``placements``. Build it with ``distribute``."""

    keys: tuple[str, ...]
    mesh: DeviceMesh
    placements: Placements
    pattern: str | None = None
    src_data_rank: int | None = None

    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        return set(select_keys(spec, self.keys, self.pattern, "distribute"))

    def placements_of(self, key: str, spec: TensorSpec) -> tuple[Placement, ...]:
        """Return the placements of ``key``, checked against the mesh and the tensor's shape.

        Raises:
            ValueError: naming the key, its shape and the placements when
                they do not fit.
        """
        chosen = tuple(self.placements(key, spec) if callable(self.placements) else self.placements)
        if len(chosen) != self.mesh.ndim:
            raise ValueError(
                f"distribute got placements {chosen} for {key!r}, but the mesh has {self.mesh.ndim} dimension(s); "
                "give one placement per mesh dimension."
            )
        for placement in chosen:
            if isinstance(placement, Shard) and not -len(spec.shape) <= placement.dim < len(spec.shape):
                raise ValueError(
                    f"distribute cannot place {key!r} of shape {spec.shape} as {placement!r}: the tensor has "
                    f"{len(spec.shape)} dimension(s). Give placements that fit this key, for example with a callable."
                )
        return chosen

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        groups = []
        for key in select_keys(spec, self.keys, self.pattern, "distribute"):
            placements = self.placements_of(key, spec[key])
            groups.append(Group((key,), (key,), _distribute_fn(key, self.mesh, placements, self.src_data_rank)))
        return groups

    def inverse(self) -> StateMap:
        return Gather(self.keys, self.pattern, self.mesh, self.placements, self.src_data_rank)


def _distribute_fn(key: str, mesh: DeviceMesh, placements: tuple[Placement, ...], src_data_rank: int | None):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        value = tensors[key]
        if value.device.type == "meta":
            # Planning runs the group on meta tensors; only the global shape matters there.
            return {key: value}
        if isinstance(value, DTensor):
            if value.device_mesh != mesh:
                raise ValueError(f"distribute got {key!r} as a DTensor on mesh {value.device_mesh}, not {mesh}; gather it first.")
            same = tuple(value.placements) == placements
            return {key: value if same else value.redistribute(mesh, placements)}
        return {key: distribute_tensor(value, mesh, placements, src_data_rank=src_data_rank)}

    return fn


@dataclasses.dataclass(frozen=True)
class Gather(StateMap):
    """Turn DTensors into full tensors on every rank. Build it with ``gather``."""

    keys: tuple[str, ...]
    pattern: str | None = None
    mesh: DeviceMesh | None = None
    placements: Placements | None = None
    src_data_rank: int | None = None

    def reads(self, spec: Mapping[str, TensorSpec]) -> set[str]:
        return set(select_keys(spec, self.keys, self.pattern, "gather"))

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        return [Group((key,), (key,), _gather_fn(key)) for key in select_keys(spec, self.keys, self.pattern, "gather")]

    def inverse(self) -> StateMap:
        if self.mesh is None or self.placements is None:
            raise ValueError(
                "This gather map has no inverse because it does not know where the tensors came from; build it "
                "with gather(keys, mesh=..., placements=...), or use distribute(keys, mesh, placements)."
            )
        return Distribute(self.keys, self.mesh, self.placements, self.pattern, self.src_data_rank)


def _gather_fn(key: str):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        value = tensors[key]
        # A plain tensor already has the full value.
        return {key: value.full_tensor() if isinstance(value, DTensor) else value}

    return fn


def distribute(
    keys: str | Iterable[str] = (),
    mesh: DeviceMesh | None = None,
    placements: Placements | None = None,
    *,
    pattern: str | None = None,
    src_data_rank: int | None = None,
) -> Distribute:
    """Return the map that makes the selected keys DTensors on ``mesh`` with ``placements``.

    Put it at the end of a load pipeline, so the loaded tree contains DTensors:
    ``load_state(path, StripPrefix("model") >> distribute(pattern=".*", mesh=mesh, placements=[Shard(0)]))``.
    Each rank reads the full tensor and keeps its own part. A DTensor
    input is redistributed, a meta tensor (planning) passes through. The
    inverse is ``gather`` with the same mesh and placements.

    Args:
        keys: one key or several, selected exactly.
        mesh: the device mesh.
        placements: one placement per mesh dimension for every key, or a
            callable ``placements(key, spec)`` that returns them per key.
        pattern: a regular expression; every key it fullmatches is selected too.
        src_data_rank: None (the default) splits each rank's own full tensor
            with no communication, which is right when every rank read the
            same checkpoint. A rank number sends that rank's values to the
            others instead, as ``distribute_tensor`` does.

    Raises:
        ValueError: when applied, naming a key whose placements do not fit
            the mesh or the tensor's shape.
        KeyError: when applied, naming a selected key that the tree lacks.
    """
    if mesh is None or placements is None:
        raise TypeError("distribute needs a mesh and placements, for example distribute(pattern='.*', mesh=mesh, placements=[Shard(0)]).")
    if not callable(placements):
        placements = tuple(placements)
    return Distribute(_as_keys(keys), mesh, placements, pattern, src_data_rank)


def gather(
    keys: str | Iterable[str] = (),
    *,
    pattern: str | None = None,
    mesh: DeviceMesh | None = None,
    placements: Placements | None = None,
) -> Gather:
    """Return the map that turns the selected DTensors into full tensors on every rank.

    Put it at the start of an export pipeline. Every rank must apply it,
    because each gather is a collective. Plain tensors pass through
    unchanged. With ``mesh`` and ``placements`` the map has an inverse,
    ``distribute`` with the same arguments.

    Args:
        keys: one key or several, selected exactly.
        pattern: a regular expression; every key it fullmatches is selected too.
        mesh: the mesh the inverse distributes to.
        placements: the placements the inverse uses, as for ``distribute``.
    """
    if not callable(placements) and placements is not None:
        placements = tuple(placements)
    return Gather(_as_keys(keys), pattern, mesh, placements)

"""Leaf maps that change values: transpose, reshape, squeeze, stack, concatenate, cast."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from ..tree import TensorSpec
from ._core import Group, StateMap, select_keys

__all__ = [
    "Cast",
    "Chunk",
    "Concatenate",
    "Reshape",
    "Squeeze",
    "Stack",
    "Transpose",
    "Unsqueeze",
    "Unstack",
    "is_widening",
]

Keys = tuple[str, ...]


def _keys(value: str | Sequence[str]) -> Keys:
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class _PerKey(StateMap):
    """A map that changes each selected key on its own.

    Keys are selected by exact name (``keys``) or by a regex that each key
    must fullmatch (``pattern``); a named key the tree lacks raises.
    """

    keys: Keys = ()
    pattern: str | None = dataclasses.field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", _keys(self.keys))

    def _selected(self, spec: Mapping[str, TensorSpec]) -> list[str]:
        return select_keys(spec, self.keys, self.pattern, type(self).__name__)

    def reads(self, spec):
        return set(self._selected(spec))

    def _plan(self, spec):
        groups = []
        for key in self._selected(spec):
            self._check(key, spec[key])
            groups.append(Group((key,), (key,), self._fn(key)))
        return groups

    def _fn(self, key: str):
        def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {key: self._apply(tensors[key])}

        return fn

    def _check(self, key: str, spec: TensorSpec) -> None:
        pass

    def _apply(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _same_keys(self) -> dict:
        return {"keys": self.keys, "pattern": self.pattern}


@dataclasses.dataclass(frozen=True)
class Transpose(_PerKey):
    """Swap two dimensions of each selected key; its own inverse."""

    dim0: int = 0
    dim1: int = 1

    def _check(self, key, spec):
        for dim in (self.dim0, self.dim1):
            if not -spec.ndim <= dim < max(spec.ndim, 1):
                raise ValueError(f"Transpose of {key!r}: dimension {dim} is out of range for shape {spec.shape}.")

    def _apply(self, value):
        return value.transpose(self.dim0, self.dim1)

    def inverse(self) -> StateMap:
        return self


@dataclasses.dataclass(frozen=True)
class Reshape(_PerKey):
    """Reshape each selected key from ``from_shape`` to ``to_shape``; the inverse reshapes back."""

    from_shape: tuple[int, ...] = ()
    to_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "from_shape", tuple(self.from_shape))
        object.__setattr__(self, "to_shape", tuple(self.to_shape))

    def _check(self, key, spec):
        if spec.shape != self.from_shape:
            raise ValueError(f"Reshape of {key!r} expects shape {self.from_shape}, but the tree contains {spec.shape}.")

    def _apply(self, value):
        return value.reshape(self.to_shape)

    def inverse(self) -> StateMap:
        return Reshape(**self._same_keys(), from_shape=self.to_shape, to_shape=self.from_shape)


@dataclasses.dataclass(frozen=True)
class Squeeze(_PerKey):
    """Remove dimension ``dim`` of size 1; the inverse unsqueezes it."""

    dim: int = 0

    def _check(self, key, spec):
        if not -spec.ndim <= self.dim < spec.ndim or spec.shape[self.dim] != 1:
            raise ValueError(f"Squeeze of {key!r} needs size 1 at dimension {self.dim}, but its shape is {spec.shape}.")

    def _apply(self, value):
        return value.squeeze(self.dim)

    def inverse(self) -> StateMap:
        return Unsqueeze(**self._same_keys(), dim=self.dim)


@dataclasses.dataclass(frozen=True)
class Unsqueeze(_PerKey):
    """Insert a dimension of size 1 at ``dim``; the inverse squeezes it."""

    dim: int = 0

    def _check(self, key, spec):
        if not -spec.ndim - 1 <= self.dim <= spec.ndim:
            raise ValueError(f"Unsqueeze of {key!r}: dimension {self.dim} is out of range for shape {spec.shape}.")

    def _apply(self, value):
        return value.unsqueeze(self.dim)

    def inverse(self) -> StateMap:
        return Squeeze(**self._same_keys(), dim=self.dim)


def is_widening(source: torch.dtype, target: torch.dtype) -> bool:
    """Return whether every value of ``source`` is exactly representable in ``target``."""
    if source == target or source == torch.bool:
        return True
    if target == torch.bool or source.is_complex or target.is_complex:
        return source.is_complex and target.is_complex and is_widening(source.to_real(), target.to_real())
    if source.is_floating_point:
        if not target.is_floating_point:
            return False
        small, large = torch.finfo(source), torch.finfo(target)
        return large.eps <= small.eps and large.max >= small.max and large.tiny <= small.tiny
    small_int = torch.iinfo(source)
    if target.is_floating_point:
        # An integer type fits when its magnitude fits the float's stored mantissa bits plus the implicit one.
        mantissa_bits = round(-math.log2(torch.finfo(target).eps))
        return max(abs(small_int.min), small_int.max) <= 2 ** (mantissa_bits + 1)
    large_int = torch.iinfo(target)
    return large_int.min <= small_int.min and large_int.max >= small_int.max


@dataclasses.dataclass(frozen=True)
class Cast(_PerKey):
    """Cast each selected key to ``dtype``.

    A cast is invertible only when it widens (every ``from_dtype`` value fits
    ``dtype`` exactly); its inverse then narrows back without loss. A
    narrowing cast's ``inverse`` raises, because the values it rounded
    cannot be restored. Without ``from_dtype`` the inverse is unknown.
    """

    dtype: torch.dtype = torch.float32
    from_dtype: torch.dtype | None = None
    restores: bool = False

    def _check(self, key, spec):
        if self.from_dtype is not None and spec.dtype != self.from_dtype:
            raise ValueError(f"Cast of {key!r} expects dtype {self.from_dtype}, but the tree contains {spec.dtype}.")

    def _apply(self, value):
        return value.to(self.dtype)

    def inverse(self) -> StateMap:
        if self.from_dtype is None:
            raise ValueError(
                f"Cast to {self.dtype} has no inverse without from_dtype; give from_dtype so the map knows what to restore."
            )
        if not (self.restores or is_widening(self.from_dtype, self.dtype)):
            raise ValueError(
                f"Cast from {self.from_dtype} to {self.dtype} narrows: it rounds values, so casting back cannot "
                "restore them. Only widening casts are invertible; keep the original tensors if you need them back."
            )
        return Cast(**self._same_keys(), dtype=self.from_dtype, from_dtype=self.dtype, restores=not self.restores)


@dataclasses.dataclass(frozen=True)
class Stack(StateMap):
    """Stack several keys into one along a new dimension; the inverse unstacks."""

    inputs: Keys
    output: str
    dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _keys(self.inputs))

    def reads(self, spec):
        return set(self.inputs)

    def _plan(self, spec):
        _require(spec, self.inputs, "Stack")
        shapes = {spec[key].shape for key in self.inputs}
        if len(shapes) != 1:
            listed = ", ".join(f"{key!r} {spec[key].shape}" for key in self.inputs)
            raise ValueError(f"Stack needs equal shapes, got {listed}.")

        def fn(tensors):
            return {self.output: torch.stack([tensors[key] for key in self.inputs], dim=self.dim)}

        return [Group(self.inputs, (self.output,), fn)]

    def inverse(self) -> StateMap:
        return Unstack(self.output, self.inputs, dim=self.dim)


@dataclasses.dataclass(frozen=True)
class Unstack(StateMap):
    """Split one key along a dimension into one key per slice; the inverse stacks."""

    input: str
    outputs: Keys
    dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", _keys(self.outputs))

    def reads(self, spec):
        return {self.input}

    def _plan(self, spec):
        _require(spec, (self.input,), "Unstack")
        shape = spec[self.input].shape
        if not shape or shape[self.dim] != len(self.outputs):
            raise ValueError(
                f"Unstack of {self.input!r} into {len(self.outputs)} keys needs size {len(self.outputs)} at "
                f"dimension {self.dim}, but its shape is {shape}."
            )

        def fn(tensors):
            return dict(zip(self.outputs, torch.unbind(tensors[self.input], dim=self.dim)))

        return [Group((self.input,), self.outputs, fn)]

    def inverse(self) -> StateMap:
        return Stack(self.outputs, self.input, dim=self.dim)


@dataclasses.dataclass(frozen=True)
class Concatenate(StateMap):
    """Concatenate keys along ``dim`` (q, k, v into qkv); the inverse chunks with the same sizes.

    ``sizes`` gives each input's extent along ``dim`` and is checked, because
    the inverse needs it.
    """

    inputs: Keys
    output: str
    sizes: tuple[int, ...]
    dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _keys(self.inputs))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if len(self.sizes) != len(self.inputs):
            raise ValueError(f"Concatenate has {len(self.inputs)} inputs but {len(self.sizes)} sizes; give one size per input.")

    def reads(self, spec):
        return set(self.inputs)

    def _plan(self, spec):
        _require(spec, self.inputs, "Concatenate")
        for key, size in zip(self.inputs, self.sizes):
            shape = spec[key].shape
            if len(shape) <= self.dim or shape[self.dim] != size:
                raise ValueError(f"Concatenate expects {key!r} to have size {size} at dimension {self.dim}, but its shape is {shape}.")

        def fn(tensors):
            return {self.output: torch.cat([tensors[key] for key in self.inputs], dim=self.dim)}

        return [Group(self.inputs, (self.output,), fn)]

    def inverse(self) -> StateMap:
        return Chunk(self.output, self.inputs, self.sizes, dim=self.dim)


@dataclasses.dataclass(frozen=True)
class Chunk(StateMap):
    """Split one key along ``dim`` into pieces of the given sizes (qkv into q, k, v); the inverse concatenates."""

    input: str
    outputs: Keys
    sizes: tuple[int, ...]
    dim: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "outputs", _keys(self.outputs))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if len(self.sizes) != len(self.outputs):
            raise ValueError(f"Chunk has {len(self.outputs)} outputs but {len(self.sizes)} sizes; give one size per output.")

    def reads(self, spec):
        return {self.input}

    def _plan(self, spec):
        _require(spec, (self.input,), "Chunk")
        shape = spec[self.input].shape
        if len(shape) <= self.dim or shape[self.dim] != sum(self.sizes):
            raise ValueError(
                f"Chunk of {self.input!r} into sizes {self.sizes} needs size {sum(self.sizes)} at dimension "
                f"{self.dim}, but its shape is {shape}."
            )

        def fn(tensors):
            return dict(zip(self.outputs, torch.split(tensors[self.input], list(self.sizes), dim=self.dim)))

        return [Group((self.input,), self.outputs, fn)]

    def inverse(self) -> StateMap:
        return Concatenate(self.outputs, self.input, self.sizes, dim=self.dim)


def _require(spec: Mapping[str, TensorSpec], keys: Keys, what: str) -> None:
    missing = [key for key in keys if key not in spec]
    if missing:
        raise KeyError(f"{what} reads key(s) {', '.join(repr(k) for k in missing)}, which the tree does not have.")

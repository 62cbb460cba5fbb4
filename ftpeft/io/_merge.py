"""Merging an adapter held in memory into a base checkpoint streamed from disk."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from ..maps import Group, StateMap
from ..methods import FullTune, LoRA, PeftMethod, PeftStack
from ..methods.lora import LoRATarget, merge_bias
from ..tree import TensorSpec

__all__ = ["AdapterMerge"]


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterMerge(StateMap):
    """Merge an in-memory adapter into base weights as they stream past.

    Reads every base key. Each LoRA-targeted weight becomes ``W + dW``;
    each FullTune leaf the adapter contains replaces the base value; every
    other key passes unchanged. The adapter itself is not part of the tree,
    so a loader never has to hold more than one base group.
    """

    method: PeftMethod
    adapter: Mapping[str, torch.Tensor]
    exact = False

    def reads(self, spec):
        return set(spec)

    def _plan(self, spec: Mapping[str, TensorSpec]) -> list[Group]:
        # FullTune values replace base leaves first; LoRA updates then apply to the trained values.
        changes: dict[str, list[Any]] = {}
        members = _members(self.method)
        for method in members:
            if isinstance(method, FullTune):
                for key in method.trainable_keys(spec):
                    if key in self.adapter:
                        changes.setdefault(key, []).append(_replace(self.adapter[key]))
        created: list[Group] = []
        for method in members:
            if isinstance(method, LoRA):
                for target in method.lora_targets(spec):
                    weight_key = target.weight_key
                    method._adapter_pair(self.adapter, target, spec[weight_key])
                    method._require(self.adapter, set(method._leaf_keys(target)), "merge")
                    leaves = {key: self.adapter[key] for key in method._leaf_keys(target)}
                    changes.setdefault(weight_key, []).append(_shear(method, target, leaves))
                    if method.config.params.lora_bias:
                        bias_key = target.bias_key
                        lora_bias = method._lora_bias(self.adapter, target, spec[weight_key])
                        scale = method.config.scale_of(target.name)
                        if bias_key in spec:
                            changes.setdefault(bias_key, []).append(_add_bias(lora_bias, scale))
                        else:
                            # The base has no bias, so the merge creates one from the LoRA bias alone.
                            created.append(Group((), (bias_key,), _new_bias(bias_key, lora_bias, scale, spec[weight_key].dtype)))
        return [Group((key,), (key,), _chain(changes.get(key, []))) for key in spec] + created

    def inverse(self) -> StateMap:
        raise ValueError("AdapterMerge has no inverse here; load the merged checkpoint and use method.unmerge with the adapter.")


def _chain(steps: list[Any]):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for step in steps:
            tensors = step(tensors)
        return dict(tensors)

    return fn


def _members(method: PeftMethod) -> list[PeftMethod]:
    if isinstance(method, PeftStack):
        return [leaf for member in method.methods for leaf in _members(member)]
    return [method]


def _shear(method: LoRA, target: LoRATarget, leaves: dict[str, torch.Tensor]):
    residual_init = method.config.params.init in ("pissa", "olora")

    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ((key, weight),) = tensors.items()
        if weight.device.type == "meta":
            return {key: weight}
        if residual_init:
            # A PiSSA or OLoRA adapter was trained on the residual W - s * B0 @ A0, which the original base determines.
            weight = method.residual_weight(target, weight)
        # The bias, when LoRA changes it, has its own group; only the weight is taken here.
        return {key: method._merge_target(target, {**leaves, key: weight}, sign=1)[key]}

    return fn


def _add_bias(lora_bias: torch.Tensor, scale: float):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ((key, bias),) = tensors.items()
        if bias.device.type == "meta":
            return {key: bias}
        return {key: merge_bias(bias, lora_bias, scale, bias.dtype)}

    return fn


def _new_bias(key: str, lora_bias: torch.Tensor, scale: float, dtype: torch.dtype):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {key: merge_bias(None, lora_bias, scale, dtype)}

    return fn


def _replace(value: torch.Tensor):
    def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ((key, old),) = tensors.items()
        return {key: value.to(old.dtype) if old.device.type != "meta" else old}

    return fn

"""Placements of adapter leaves over a DTensor base, and the reduction of their gradients."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from ..methods.base import PeftMethod
from ..methods.lora import LoRA
from ..methods.stack import PeftStack
from ..tree import Tree

__all__ = ["PlacementRule", "distribute_adapters", "lora_placements", "reduce_gradients"]

#: A user's placement choice for adapter leaves: a callable ``rule(key, weight)``
#: that returns the placements of adapter leaf ``key`` (one per mesh dimension
#: of ``weight``, the DTensor base weight it adapts), or None to keep the
#: method's default. A mapping from key or regular expression (fullmatch) to
#: placements works too.
PlacementRule = Callable[[str, DTensor], "Sequence[Placement] | None"] | Mapping[str, Sequence[Placement]]

_LORA_LEAVES = ("lora_A", "lora_B", "lora_bias")


def lora_placements(leaf: str, weight: DTensor, *, transposed: bool = False) -> tuple[Placement, ...]:
    """Return the default placements of one LoRA leaf, chosen per mesh dimension of its base weight.

    On each mesh dimension the rule keeps the merge ``W + s * B @ A``
    shard-local:

    - ``W`` split along its output rows (``Shard(0)``, or ``Shard(1)`` with
      ``fan_in_fan_out``): ``lora_B`` and ``lora_bias`` are ``Shard(0)``,
      ``lora_A`` is ``Replicate``;
    - ``W`` split along its input columns: ``lora_A`` is ``Shard(1)``,
      ``lora_B`` and ``lora_bias`` are ``Replicate``;
    - ``W`` replicated, or split along a convolution kernel dimension: every
      leaf is ``Replicate``. For a split kernel the merge then computes the
      full update on each rank and adds the rank's slice, with no
      communication.

    Args:
        leaf: ``"lora_A"``, ``"lora_B"`` or ``"lora_bias"``.
        weight: the base weight, a DTensor.
        transposed: True when the weight is stored ``(in, out)``
            (``LoRAParameters(fan_in_fan_out=True)``).

    Raises:
        ValueError: if the weight has a placement other than ``Shard`` or
            ``Replicate`` on some mesh dimension, such as ``Partial`` or the
            ``_StridedShard`` that FSDP2 gives a tensor-parallel weight,
            because the rule has no matching adapter layout for it.
    """
    if leaf not in _LORA_LEAVES:
        raise ValueError(f"lora_placements accepts the leaves {_LORA_LEAVES}, got {leaf!r}.")
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    chosen: list[Placement] = []
    for placement in weight.placements:
        if isinstance(placement, Replicate):
            chosen.append(Replicate())
        elif isinstance(placement, Shard):
            dim = placement.dim % weight.ndim
            if dim == out_dim:
                chosen.append(Replicate() if leaf == "lora_A" else Shard(0))
            elif dim == in_dim and leaf == "lora_A":
                chosen.append(Shard(1))
            else:
                # A split kernel dimension stays whole in A: the merge flattens A, which DTensor
                # cannot do for a dimension that the mesh does not divide evenly.
                chosen.append(Replicate())
        else:
            raise ValueError(
                f"The base weight has placements {tuple(weight.placements)}; {placement!r} has no matching layout for "
                f"{leaf}. Redistribute the weight to Shard or Replicate placements first, for example "
                "weight.redistribute(weight.device_mesh, [Replicate()])."
            )
    return tuple(chosen)


def _lora_members(method: PeftMethod) -> list[LoRA]:
    if isinstance(method, PeftStack):
        return [leaf for member in method.methods for leaf in _lora_members(member)]
    return [method] if isinstance(method, LoRA) else []


def _owners(method: PeftMethod, tree: Mapping[str, Any]) -> dict[str, tuple[str, str, bool, str]]:
    """Map each adapter key to ``(base weight key, leaf role, transposed, target kind)``.

    The role is ``lora_A``, ``lora_B``, ``lora_bias`` or ``magnitude`` (DoRA's
    vector, one value per output row, placed like the bias). An embedding
    table ``(num_embeddings, dim)`` is placed as a transposed linear weight,
    since its output dimension is dim 1.
    """
    owners: dict[str, tuple[str, str, bool, str]] = {}
    for lora in _lora_members(method):
        for target in lora.lora_targets(tree):
            transposed = target.transposed or target.kind == "embedding"
            roles = {target.key_a: "lora_A", target.key_b: "lora_B", target.key_lora_bias: "lora_bias", target.key_magnitude: "magnitude"}
            for key, role in roles.items():
                owners[key] = (target.weight_key, role, transposed, target.kind)
    return owners


def _default_placements(role: str, weight: DTensor, transposed: bool, kind: str) -> tuple[Placement, ...]:
    """Return the method's default placements of one adapter leaf."""
    if kind == "experts":
        # Expert e owns columns e, e + E, ... of B, which no Shard placement keeps together, so both leaves stay whole.
        return tuple(Replicate() for _ in weight.placements)
    if role != "magnitude":
        return lora_placements(role, weight, transposed=transposed)
    placements = lora_placements("lora_bias", weight, transposed=transposed)
    if kind == "conv":
        # A kernel's magnitude is (1, out, 1, ...), so its output dimension is dim 1.
        placements = tuple(Shard(1) if isinstance(p, Shard) else p for p in placements)
    return placements


def _rule_placements(rule: PlacementRule | None, key: str, weight: DTensor) -> Sequence[Placement] | None:
    if rule is None:
        return None
    if callable(rule):
        return rule(key, weight)
    for pattern, placements in rule.items():
        if pattern == key or re.fullmatch(pattern, key):
            return placements
    return None


def has_dtensor(tree: Mapping[str, Any]) -> bool:
    """Return whether any leaf of ``tree`` is a DTensor."""
    return any(isinstance(value, DTensor) for value in tree.values())


def distribute_adapters(
    method: PeftMethod,
    tree: Mapping[str, Any],
    placements: PlacementRule | None = None,
    *,
    src_data_rank: int | None = 0,
) -> Tree:
    """Return a new tree whose adapter leaves are DTensors on the mesh of the base weight they adapt.

    A plain adapter leaf contains the full (global) value and is split with
    ``distribute_tensor``; a DTensor leaf is redistributed when its
    placements differ. Base leaves and adapters of plain base weights are
    returned as they are. ``method.inject`` calls this with the default
    placements when the base weights are DTensors, so call it yourself to
    override the placements, or to place an adapter loaded from disk.
    The returned leaves carry no autograd history, so call
    ``requires_grad_()`` on the ones you train.

    Args:
        method: the method that owns the adapter leaves.
        tree: the adapted tree, base leaves included.
        placements: a ``PlacementRule``; keys it does not cover (or for
            which a callable returns None) get the method's default, for
            LoRA ``lora_placements``.
        src_data_rank: the rank whose plain values are the source of truth,
            as in ``distribute_tensor``. The default 0 sends rank 0's values
            to every rank, so adapters initialised from different random
            states still agree. None splits each rank's own values with no
            communication, which is right only when every rank has the same values.

    Raises:
        ValueError: naming the key when a placement does not fit the mesh,
            a DTensor leaf lives on another mesh than its base weight, or
            an adapter leaf has no placement rule.
    """
    placed: Tree = dict(tree)
    if not has_dtensor(tree):
        return placed
    owners = _owners(method, tree)
    for key in sorted(method.adapter_keys(tree) & tree.keys()):
        value = tree[key]
        if key not in owners:
            raise ValueError(
                f"No placement rule covers adapter leaf {key!r} of {type(method).__name__}; pass placements= with an "
                "entry for it."
            )
        weight_key, role, transposed, kind = owners[key]
        weight = tree.get(weight_key)
        if not isinstance(weight, DTensor):
            continue
        chosen = _rule_placements(placements, key, weight)
        if chosen is None:
            chosen = _default_placements(role, weight, transposed, kind)
        chosen = tuple(chosen)
        if len(chosen) != weight.device_mesh.ndim:
            raise ValueError(
                f"Placements {chosen} for {key!r} have {len(chosen)} entries, but the mesh of {weight_key!r} has "
                f"{weight.device_mesh.ndim} dimension(s); give one placement per mesh dimension."
            )
        placed[key] = _place(key, value, weight, chosen, src_data_rank)
    return placed


def _place(key: str, value: Any, weight: DTensor, placements: tuple[Placement, ...], src_data_rank: int | None) -> DTensor:
    mesh = weight.device_mesh
    for placement in placements:
        if isinstance(placement, Shard) and not -value.ndim <= placement.dim < value.ndim:
            raise ValueError(
                f"Placement {placement!r} does not fit adapter leaf {key!r} of shape {tuple(value.shape)}; shard one "
                f"of its {value.ndim} dimension(s)."
            )
    if isinstance(value, DTensor):
        if value.device_mesh != mesh:
            raise ValueError(
                f"Adapter leaf {key!r} lives on mesh {value.device_mesh}, but its base weight on {mesh}; pass plain "
                "tensors, or DTensors on the base weight's mesh."
            )
        return value if tuple(value.placements) == placements else value.redistribute(mesh, placements)
    return distribute_tensor(value.detach(), mesh, placements, src_data_rank=src_data_rank)


def reduce_gradients(
    grads: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    *,
    group: dist.ProcessGroup | None = None,
) -> Tree:
    """Return the gradients with the placements of their parameters, summed or averaged over data-parallel ranks.

    - A DTensor gradient is redistributed to its parameter's placements. A
      ``Partial`` gradient, which DTensor's autograd returns for a
      replicated leaf when the batch is sharded, is summed across ranks
      that way. Because the loss of a DTensor forward is already the
      global loss, the sum is the gradient of that loss.
    - A plain gradient, as each rank computes it with ``fsdp_forward`` on
      its own batch, is averaged over ``group`` with ``all_reduce``, so
      equal-sized local batches give the gradient of the mean loss.

    Args:
        grads: gradients keyed like ``params``.
        params: the leaves the gradients belong to.
        group: the process group of the data-parallel ranks for plain
            gradients; the default group when None.

    Raises:
        KeyError: naming a gradient key that ``params`` lacks.
        ValueError: naming a key whose gradient and parameter differ in kind
            or mesh.
    """
    missing = sorted(grads.keys() - params.keys())
    if missing:
        raise KeyError(f"reduce_gradients got gradients for key(s) {missing[:5]} that params does not have.")
    reduced: Tree = {}
    plain: dict[str, torch.Tensor] = {}
    for key, grad in grads.items():
        param = params[key]
        if isinstance(param, DTensor) != isinstance(grad, DTensor):
            raise ValueError(
                f"The gradient of {key!r} is a {type(grad).__name__} but the parameter a {type(param).__name__}; "
                "pass the gradients that autograd returned for these parameters."
            )
        if isinstance(grad, DTensor):
            if grad.device_mesh != param.device_mesh:
                raise ValueError(f"The gradient of {key!r} lives on mesh {grad.device_mesh}, its parameter on {param.device_mesh}.")
            same = tuple(grad.placements) == tuple(param.placements)
            reduced[key] = grad if same else grad.redistribute(param.device_mesh, param.placements)
        else:
            plain[key] = grad
    if plain:
        world = dist.get_world_size(group)
        for key, grad in plain.items():
            total = grad.detach().clone()
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
            reduced[key] = total / world
    return {key: reduced[key] for key in grads}

"""Running a model wrapped by FSDP2's ``fully_shard`` with adapters from a tree."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..forward import _add_output_biases, _AdaptedWeights, _as_tree
from ..methods.base import PeftMethod
from ..tree import spec_of

__all__ = ["fsdp_forward"]


class _AdaptedAtCall(_AdaptedWeights):
    """The forward's weight interception, with weights registered as their modules are called.

    FSDP2 puts a freshly gathered weight on each module just before the
    module runs, so the weight to intercept is known only then.
    """

    def __init__(self) -> None:
        super().__init__([])

    def register(self, weight: torch.Tensor, chain: list, training: bool) -> None:
        self._entries[id(weight)] = (weight, chain, training)
        self._materialised.pop(id(weight), None)

    def unregister(self, weight: torch.Tensor) -> None:
        self._entries.pop(id(weight), None)
        self._materialised.pop(id(weight), None)

    def _linear(self, func, entry, args, kwargs):
        # Each adapter adds a new tensor instead of the fused addmm, whose result
        # is a view: FSDP2 warns about a module that returns a view, because an
        # in-place op on it would skip the all-gather of the backward.
        weight, chain, training = entry
        args, kwargs = self._materialise_others(args, kwargs, weight)
        x = args[0] if args else kwargs["input"]
        deltas = [adapter.linear_delta(x, training) for adapter in chain]
        if any(delta is None for delta in deltas):
            fallback = self._call_with(func, args, kwargs, self._materialise_if_adapted(weight))
            return _add_output_biases(fallback, chain, channel_dim=-1)
        output = func(*args, **kwargs)
        for delta in deltas:
            output = output + delta.to(output.dtype)
        return output


def fsdp_forward(model: nn.Module, method: PeftMethod) -> Callable[..., Any]:
    """Return ``fn(adapters, *args, **kwargs)`` that runs an FSDP2 model with ``method``'s adapters.

    ``model`` is wrapped by ``fully_shard`` and owns the sharded base
    weights. FSDP2 gathers each one before its module runs, as in plain
    FSDP2 training. ``fn`` takes only the method's adapter leaves, as
    full-size plain tensors on every rank. It applies them to the gathered
    weight of each targeted module with the same rules as
    ``functional_forward``: the unmerged low-rank path for ``F.linear`` and
    convolutions, the materialised ``W + dW`` for any other op.

    Each rank runs its own batch. Average the adapter gradients over the
    ranks with ``reduce_gradients`` before the optimizer step, so every
    rank applies the same update and the adapters stay identical.

    While ``fn`` runs, each targeted module has a forward pre-hook that
    registers its weight and a forward hook that unregisters it. The hooks
    are removed before ``fn`` returns. A weight is therefore adapted only
    while its own module runs: a tied LM head that calls ``F.linear`` with
    the targeted embedding's gathered weight gets the plain weight, as with
    ``functional_forward``.

    Args:
        model: a module on which ``fully_shard`` was called (on it or on
            its submodules).
        method: the PEFT method whose adapter leaves ``fn`` receives.

    Raises:
        TypeError: if no part of ``model`` is wrapped by ``fully_shard``;
            use ``functional_forward`` for other models.
    """
    if not any(isinstance(module, FSDPModule) for module in model.modules()):
        raise TypeError(
            f"fsdp_forward needs a model wrapped by fully_shard, but no module of {type(model).__name__} is an "
            "FSDPModule. Call torch.distributed.fsdp.fully_shard on it first, or use ftpeft.functional_forward."
        )
    method.check_model(model)
    base_spec = spec_of(model)
    adapter_keys = frozenset(method.adapter_keys(base_spec))
    bind = method.bind_forward(base_spec)
    submodules = dict(model.named_modules(remove_duplicate=False))

    def fn(adapters: Mapping[str, Any] | Sequence[Mapping[str, Any]], *args: Any, **kwargs: Any) -> Any:
        tree = _as_tree(adapters)
        _check_adapters(tree, adapter_keys)
        # bind checks the adapter shapes against the base weights, so it gets specs for the base keys.
        chains = bind({**base_spec, **tree})

        mode = _AdaptedAtCall()
        handles = []
        try:
            for weight_key, chain in chains.items():
                module_path, _, name = weight_key.rpartition(".")
                module = submodules[module_path]
                handles.append(module.register_forward_pre_hook(_registrar(mode, name, chain)))
                handles.append(module.register_forward_hook(_unregistrar(mode, name)))
            with mode:
                return model(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    return fn


def _registrar(mode: _AdaptedAtCall, name: str, chain: list):
    def hook(module: nn.Module, args: Any) -> None:
        weight = getattr(module, name)
        if isinstance(weight, DTensor):
            raise RuntimeError(
                f"{type(module).__name__}.{name} is still a DTensor when the module runs. Either no fully_shard call "
                "covers this module (call fully_shard on it or on a module that contains it), or tensor parallelism "
                "also splits the weight, which fsdp_forward does not support: for that, pass a DTensor tree to "
                "ftpeft.functional_forward instead."
            )
        mode.register(weight, chain, module.training)

    return hook


def _unregistrar(mode: _AdaptedAtCall, name: str):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        mode.unregister(getattr(module, name))

    return hook


def _check_adapters(tree: Mapping[str, Any], adapter_keys: frozenset[str]) -> None:
    extra = sorted(tree.keys() - adapter_keys)
    if extra:
        raise ValueError(
            f"fsdp_forward takes the method's adapter leaves only, but got key(s) {', '.join(repr(k) for k in extra[:5])}. "
            "The FSDP2 model owns the base weights, so pass the trainable half of split_trainable."
        )
    missing = sorted(adapter_keys - tree.keys())
    if missing:
        raise KeyError(f"The adapter tree has no {', '.join(repr(k) for k in missing[:5])}; pass every adapter leaf of the method.")
    for key, value in tree.items():
        if isinstance(value, DTensor):
            raise TypeError(
                f"Adapter leaf {key!r} is a DTensor, but FSDP2 runs each module on plain gathered weights. Pass the "
                "adapter as full-size plain tensors on every rank, for example gather(pattern='.*')(adapters) "
                "with ftpeft.distributed.gather."
            )

"""Run a model on a tree, with adapters applied to the weights a method targets.

``functional_forward`` passes the base tensors to
``torch.func.functional_call`` and, while the model runs, a
``TorchFunctionMode`` watches the targeted weights:

- ``F.linear(x, W, b)`` on a targeted ``W`` becomes
  ``F.linear(x, W, b) + s * B(A(dropout(x)))``, with no dense ``(out, in)``
  update built;
- any other op that receives a targeted ``W`` gets the materialised
  ``W + s * B @ A`` instead, so the result is right however the model uses
  the weight;
- shape, dtype and device queries see ``W`` itself and cost nothing.

Each targeted weight is passed to ``functional_call`` as its own view, with
``tie_weights=False``, so a weight tied to another module (an embedding and
an LM head) carries the adapter only into the module the method targets.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .methods.base import PeftMethod, WeightAdapter
from .tree import Tree, combine, spec_of

__all__ = ["functional_forward"]

_LINEAR_FUNCTIONS = frozenset({F.linear, torch._C._nn.linear})
_EMBEDDING_FUNCTIONS = frozenset({F.embedding})
# Ops that return the transpose of a 2-D weight as a view.
_TRANSPOSE_FUNCTIONS = frozenset(
    {torch.t, torch.Tensor.t, torch.transpose, torch.Tensor.transpose, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
)
_CONV_FUNCTIONS = frozenset({F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d})
# Ops that compute x @ W with the weight as second operand, as transformers'
# Conv1D does with a weight stored (in, out).
_MATMUL_FUNCTIONS = frozenset({torch.addmm, torch.Tensor.addmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm})


def _metadata_functions() -> frozenset[Any]:
    functions: set[Any] = {
        torch.Tensor.size,
        torch.Tensor.dim,
        torch.Tensor.numel,
        torch.Tensor.nelement,
        torch.Tensor.stride,
        torch.Tensor.element_size,
        torch.Tensor.is_floating_point,
        torch.Tensor.is_complex,
        torch.Tensor.is_contiguous,
        torch.Tensor.get_device,
        torch.Tensor.__len__,
        torch.Tensor.__hash__,
    }
    for name in ("shape", "dtype", "device", "ndim", "requires_grad", "layout", "is_cuda", "is_meta", "is_sparse", "is_quantized"):
        functions.add(getattr(torch.Tensor, name).__get__)
    return frozenset(functions)


_METADATA_FUNCTIONS = _metadata_functions()


class _AdaptedWeights(TorchFunctionMode):
    """Routes every use of a targeted weight to its adapters.

    A weight is recognised by identity: ``functional_forward`` passes each
    targeted weight as a fresh view that nothing else holds.
    """

    def __init__(self, entries: Sequence[tuple[torch.Tensor, list[WeightAdapter], bool]]):
        super().__init__()
        self._entries = {id(weight): (weight, chain, training) for weight, chain, training in entries}
        self._materialised: dict[int, torch.Tensor] = {}

    def _entry(self, value: Any) -> tuple[torch.Tensor, list[WeightAdapter], bool] | None:
        if not isinstance(value, torch.Tensor):
            return None
        entry = self._entries.get(id(value))
        if entry is not None and entry[0] is value:
            return entry
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func in _LINEAR_FUNCTIONS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            entry = self._entry(weight)
            if entry is not None and not any(adapter.transposed for adapter in entry[1]):
                return self._linear(func, entry, args, kwargs)
        elif func in _MATMUL_FUNCTIONS:
            result = self._matmul(func, args, kwargs)
            if result is not None:
                return result
        elif func in _CONV_FUNCTIONS and len(args) > 1 and not kwargs:
            result = self._conv(func, args)
            if result is not None:
                return result
        elif func in _EMBEDDING_FUNCTIONS:
            result = self._embedding(func, args, kwargs)
            if result is not None:
                return result
        elif func in _TRANSPOSE_FUNCTIONS:
            result = self._transposed(func, args, kwargs)
            if result is not None:
                return result
        elif func is torch.Tensor.__getitem__ and len(args) == 2:
            result = self._expert(func, args)
            if result is not None:
                return result
        if func in _METADATA_FUNCTIONS or not self._touches_adapted(args, kwargs):
            return func(*args, **kwargs)
        args, kwargs = optree.tree_map(self._materialise_if_adapted, (args, kwargs))
        return func(*args, **kwargs)

    def _linear(self, func, entry, args, kwargs):
        weight, chain, training = entry
        args, kwargs = self._materialise_others(args, kwargs, weight)
        x = args[0] if args else kwargs["input"]
        bias = None
        if any(adapter.needs_output_without_bias for adapter in chain):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            output = func(x, weight)
        else:
            output = func(*args, **kwargs)
        for adapter in chain:
            output = adapter.add_to_output(x, output, training)
            if output is None:
                fallback = self._call_with(func, args, kwargs, self._materialise_if_adapted(weight))
                return _add_output_biases(fallback, chain, channel_dim=-1)
        return output if bias is None else output + bias

    def _embedding(self, func, args, kwargs):
        """Return ``F.embedding`` in the base table plus each adapter's rows, or None to fall back to the materialised table."""
        names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        entry = self._entry(bound.get("weight"))
        # max_norm renormalises the looked-up rows of the table in place, which only the materialised table may undergo.
        if entry is None or bound.get("max_norm") is not None:
            return None
        weight, chain, _ = entry
        ids = bound["input"]
        padding_idx = bound.get("padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        scale_grad_by_freq, sparse = bound.get("scale_grad_by_freq", False), bound.get("sparse", False)
        output = func(ids, weight, padding_idx, None, bound.get("norm_type", 2.0), scale_grad_by_freq, sparse)
        for adapter in chain:
            output = adapter.lookup_add(ids, output, padding_idx, scale_grad_by_freq, sparse)
            if output is None:
                return None
        return output

    def _transposed(self, func, args, kwargs):
        """Return ``W.t()`` of an adapted 2-D weight as a view that carries the adapters in the other layout, or None to fall back."""
        entry = self._entry(args[0]) if args else None
        if entry is None or args[0].dim() != 2:
            return None
        weight, chain, training = entry
        views = [adapter.transposed_view() for adapter in chain]
        if any(adapter is None for adapter in views):
            return None
        view = func(*args, **kwargs)
        # transpose(x, 0, 0) and the like return the weight's own layout.
        if tuple(view.shape) != tuple(reversed(weight.shape)) or view.stride() != tuple(reversed(weight.stride())):
            return None
        self._entries[id(view)] = (view, views, training)
        return view

    def _expert(self, func, args):
        """Return ``W[index]`` of an adapted expert stack as a view that carries each expert's adapter, or None to fall back."""
        entry = self._entry(args[0])
        index = args[1]
        if entry is None:
            return None
        integral = isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0 and not index.is_floating_point())
        if not integral or args[0].dim() != 3:
            return None
        weight, chain, training = entry
        experts = [adapter.expert(index) for adapter in chain]
        if any(adapter is None for adapter in experts):
            return None
        view = func(weight, index)
        self._entries[id(view)] = (view, experts, training)
        return view

    def _matmul(self, func, args, kwargs):
        """Return ``x @ W`` plus the unmerged updates for a transposed weight, or None to fall back."""
        is_addmm = func in (torch.addmm, torch.Tensor.addmm)
        operands = args[1:3] if is_addmm else args[:2]
        if len(operands) != 2 or kwargs.keys() - {"beta", "alpha"}:
            return None
        x, weight = operands
        entry = self._entry(weight)
        if entry is None or not all(adapter.transposed for adapter in entry[1]) or self._entry(x) is not None:
            return None
        if not is_addmm and (x.dim() < 2 or kwargs):
            return None
        deltas = [adapter.linear_delta(x, entry[2]) for adapter in entry[1]]
        if any(delta is None for delta in deltas):
            return None
        args, kwargs = self._materialise_others(args, kwargs, weight)
        output = func(*args, **kwargs)
        factor = kwargs.get("alpha", 1) if is_addmm else 1
        for delta in deltas:
            output = output + (delta * factor if factor != 1 else delta).to(output.dtype)
        return output

    def _conv(self, func, args):
        """Return the convolution plus each adapter's unmerged part, or None to fall back to the materialised kernel."""
        entry = self._entry(args[1])
        if entry is None:
            return None
        x, weight, *rest = args
        _, stride, padding, dilation, groups = (rest + [None, 1, 0, 1, 1][len(rest):])[:5]
        args, _ = self._materialise_others(args, {}, weight)
        output = func(*args)
        for adapter in entry[1]:
            output = adapter.conv_add(func, x, output, stride, padding, dilation, groups, entry[2])
            if output is None:
                # Grouped kernels (and DoRA) run on the materialised kernel, plus any bias no leaf carries.
                fallback = func(args[0], self._materialise_if_adapted(weight), *args[2:])
                return _add_output_biases(fallback, entry[1], channel_dim=1)
        return output

    def _materialise_others(self, args: tuple, kwargs: dict, weight: torch.Tensor) -> tuple[tuple, dict]:
        """Materialise adapted tensors among the arguments other than ``weight``, such as an adapted bias."""
        entries = self._entries
        others = [value for value in (*args, *kwargs.values()) if value is not weight]
        if not any(id(value) in entries for value in others):
            return args, kwargs
        args = tuple(a if a is weight else self._materialise_if_adapted(a) for a in args)
        kwargs = {k: (v if v is weight else self._materialise_if_adapted(v)) for k, v in kwargs.items()}
        return args, kwargs

    @staticmethod
    def _call_with(func, args, kwargs, weight):
        if len(args) > 1:
            return func(args[0], weight, *args[2:], **kwargs)
        return func(*args, **{**kwargs, "weight": weight})

    def _touches_adapted(self, args: tuple, kwargs: dict) -> bool:
        # The entries keep every adapted weight alive, so no other live object
        # can share one's id: an id match alone identifies an adapted weight.
        entries = self._entries
        for value in args:
            if id(value) in entries:
                return True
            if type(value) in (list, tuple) and any(id(item) in entries for item in value):
                return True
        for value in kwargs.values():
            if id(value) in entries:
                return True
            if type(value) in (list, tuple) and any(id(item) in entries for item in value):
                return True
        return False

    def _materialise_if_adapted(self, value: Any) -> Any:
        entry = self._entry(value)
        if entry is None:
            return value
        weight, chain, _ = entry
        cached = self._materialised.get(id(weight))
        if cached is None:
            cached = weight
            for adapter in chain:
                cached = adapter.materialise(cached)
            self._materialised[id(weight)] = cached
        return cached


def _add_output_biases(output: torch.Tensor, chain: list[WeightAdapter], *, channel_dim: int) -> torch.Tensor:
    """Add each adapter's ``output_bias`` along the output channels (the last dim of a linear, dim 1 of a convolution)."""
    for adapter in chain:
        bias = adapter.output_bias
        if bias is not None:
            shape = [1] * output.dim()
            shape[channel_dim] = -1
            output = output + bias.view(shape).to(output.dtype)
    return output


def _tied_names(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Map each parameter or buffer name to all names of the same tensor."""
    groups: dict[int, list[str]] = {}
    for name, value in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(value), []).append(name)
    return {name: tuple(names) for names in groups.values() for name in names}


def functional_forward(model: nn.Module, method: PeftMethod | None = None) -> Callable[..., Any]:
    """Return ``fn(tree, *args, **kwargs)`` that runs ``model`` on ``tree`` with ``method``'s adapters.

    The method plans once, here, on ``spec_of(model)``; each call only looks
    up the tree's leaves, so ``fn`` works under ``torch.func.grad``,
    ``torch.func.vmap`` and ``torch.compile(fullgraph=True)``. The model's
    parameters, buffers and flags are the same after every call, and so are
    the tree's tensors. Buffers are passed as copies, so a layer that updates
    a buffer in place (BatchNorm's running statistics in training mode)
    updates a copy, which is then discarded.

    ``fn`` takes ``tree``, one mapping or a tuple or list of disjoint
    mappings such as ``(trainable, frozen)``, then the model's own inputs.
    The tree must hold every parameter of the model (under any one of a
    tied weight's names) and the method's adapter leaves. Buffers it lacks
    are taken from the model, so a model built on the ``meta`` device needs
    its buffers in the tree or real buffers of its own.

    Dropout in an adapter applies only while the targeted module is in
    training mode (``module.training``); under ``vmap`` pass
    ``randomness="different"`` or ``"same"`` when dropout is active.

    Args:
        model: the module to run, on any device.
        method: the PEFT method whose adapter leaves the tree holds, or None
            to run the plain model (for example on a merged tree).

    Returns:
        ``fn(tree, *args, **kwargs)``, which returns the model's output.
        It raises ``ValueError`` naming keys the model does not have or
        parameters the tree lacks, and ``KeyError`` naming missing adapter
        leaves.

    Raises:
        ValueError: if the method does not fit the model, for example LoRA
            on a transformers ``Conv1D`` without ``fan_in_fan_out``.
    """
    _reject_fully_shard(model)
    base_spec = spec_of(model)
    if method is not None:
        method.check_model(model)
    bind = method.bind_forward(base_spec) if method is not None else (lambda tree: {})
    adapter_keys = frozenset(method.adapter_keys(base_spec)) if method is not None else frozenset()
    tied = _tied_names(model)
    parameter_names = frozenset(name for name, _ in model.named_parameters(remove_duplicate=False))
    module_buffers = dict(model.named_buffers(remove_duplicate=False))
    submodules = dict(model.named_modules(remove_duplicate=False))

    def fn(tree: Mapping[str, Any] | Sequence[Mapping[str, Any]], *args: Any, **kwargs: Any) -> Any:
        full = _as_tree(tree)
        params = {k: v for k, v in full.items() if k not in adapter_keys}
        _check_keys(params, tied, parameter_names)

        # Copy every buffer so that in-place updates reach neither the tree nor the module.
        # A buffer the tree gives under another (tied) name is filled from that name below.
        empty = []
        for name, buffer in module_buffers.items():
            if name in params:
                params[name] = params[name].clone()
            elif not any(alias in params for alias in tied[name]):
                if buffer.is_meta:
                    empty.append(name)
                params[name] = buffer.clone()
        if empty:
            _raise_meta_buffers(empty)

        # Fill the other names of tied weights before the targeted name gets its
        # view, so untargeted aliases see the plain base tensor.
        for key in list(params):
            for alias in tied.get(key, ()):
                params.setdefault(alias, params[key])
        adapters = bind({**full, **params})

        entries = []
        for weight_key, chain in adapters.items():
            weight = params[weight_key]
            view = weight.view(weight.shape)
            params[weight_key] = view
            training = submodules[chain[0].module].training
            entries.append((view, chain, training))

        if not entries:
            return functional_call(model, params, args, kwargs, tie_weights=False)
        with _AdaptedWeights(entries):
            return functional_call(model, params, args, kwargs, tie_weights=False)

    return fn


def _reject_fully_shard(model: nn.Module) -> None:
    # FSDP2 swaps its own gathered weights into the modules while they run, which would bypass the tree.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None and any(isinstance(module, fsdp.FSDPModule) for module in model.modules()):
        raise TypeError(
            f"{type(model).__name__} is wrapped by fully_shard, whose modules run on their own gathered weights, not on "
            "the tree. Use ftpeft.distributed.fsdp_forward for FSDP2 models."
        )


def _raise_meta_buffers(empty: list[str]) -> None:
    # A meta buffer has no values, and some ops silently read garbage from it instead of failing.
    raise ValueError(
        f"The model's buffer(s) {', '.join(repr(k) for k in sorted(empty)[:5])} are on the meta device and the tree "
        "has no value for them. Add them to the tree, or build the model with ftpeft.parameters_on_meta(), which "
        "keeps buffers real while parameters go to meta."
    )


def _as_tree(tree: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Tree:
    if isinstance(tree, Mapping):
        return dict(tree)
    if isinstance(tree, (tuple, list)) and all(isinstance(part, Mapping) for part in tree):
        return combine(*tree)
    raise TypeError(
        f"fn expects a mapping of tensors or a tuple/list of disjoint mappings, got {type(tree).__name__}."
    )


def _check_keys(params: Mapping[str, Any], tied: Mapping[str, tuple[str, ...]], parameter_names: frozenset[str]) -> None:
    unknown = sorted(k for k in params if k not in tied)
    if unknown:
        raise ValueError(
            f"The tree contains key(s) {', '.join(repr(k) for k in unknown[:5])} that the model has no parameter or "
            "buffer for, and the method does not own. Check the key names (a prefix such as 'model.' or "
            "'_orig_mod.'), or pass the method that created these leaves."
        )
    covered = {alias for key in params for alias in tied[key]}
    missing = sorted(parameter_names - covered)
    if missing:
        raise ValueError(
            f"The tree has no value for parameter(s) {', '.join(repr(k) for k in missing[:5])}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}. Pass the full tree, for example "
            "(trainable, frozen) from split_trainable."
        )

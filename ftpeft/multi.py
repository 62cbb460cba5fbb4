"""Many adapters at once: stacked adapters for ``vmap``, and mixed batches.

Two ways to run one base model with several adapters of the same method:

- every adapter on the same inputs: stack the adapters with
  ``stack_adapters`` and map the forward over the new leading dimension,
  ``torch.func.vmap(lambda adapter: fn((adapter, frozen), x))(stacked)``;
- each sample with its own adapter, or with none: ``mixed_forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optree
import torch
from torch import nn

from .forward import functional_forward
from .methods.base import PeftMethod
from .tree import Tree

__all__ = ["mixed_forward", "stack_adapters", "unstack_adapters"]


def stack_adapters(adapters: Sequence[Mapping[str, torch.Tensor]]) -> Tree:
    """Stack adapters of one method into one tree with a new leading dimension.

    Leaf ``key`` of the result is ``torch.stack([adapter[key] for adapter in adapters])``,
    in the first adapter's key order. Map a forward over dimension 0 with
    ``torch.func.vmap`` to run every adapter in one call:

        fn = ftpeft.functional_forward(model, method)
        outputs = torch.func.vmap(lambda adapter: fn((adapter, frozen), x))(stacked)

    ``outputs[i]`` then equals ``fn((adapters[i], frozen), x)``.

    Raises:
        ValueError: if ``adapters`` is empty, or an adapter's keys, or a
            leaf's shape or dtype, differ from the first adapter's. The
            message names the adapter's index and the key.
    """
    if not adapters:
        raise ValueError("stack_adapters needs at least one adapter; got none.")

    first = adapters[0]
    for index, adapter in enumerate(adapters[1:], start=1):
        missing = sorted(first.keys() - adapter.keys())
        extra = sorted(adapter.keys() - first.keys())
        if missing or extra:
            raise ValueError(
                f"Adapter {index} lacks key(s) {missing[:3]} and has extra key(s) {extra[:3]} compared with adapter 0; "
                "only adapters of one method and one base model stack."
            )
        for key, leaf in adapter.items():
            if leaf.shape != first[key].shape or leaf.dtype != first[key].dtype:
                raise ValueError(
                    f"Adapter {index} has {key!r} of shape {tuple(leaf.shape)} and dtype {leaf.dtype}, but adapter 0 "
                    f"has shape {tuple(first[key].shape)} and dtype {first[key].dtype}; stacked leaves must match."
                )

    return {key: torch.stack([adapter[key] for adapter in adapters]) for key in first}


def unstack_adapters(stacked: Mapping[str, torch.Tensor]) -> list[Tree]:
    """Split a stacked tree along dimension 0 into one adapter per index; the inverse of ``stack_adapters``.

    Raises:
        ValueError: if the leaves differ in the size of dimension 0.
    """
    sizes = {key: leaf.shape[0] if leaf.ndim else None for key, leaf in stacked.items()}
    if len(set(sizes.values())) > 1 or None in sizes.values():
        raise ValueError(f"Stacked leaves must share a leading dimension; got sizes {sizes}.")
    count = next(iter(sizes.values()), 0)
    return [{key: leaf[index] for key, leaf in stacked.items()} for index in range(count)]


def mixed_forward(model: nn.Module, method: PeftMethod) -> Callable[..., Any]:
    """Return ``fn(base, adapters, names, *args, **kwargs)``, which runs each sample with the adapter it names.

    ``adapters`` maps names to adapter trees of ``method``, and
    ``names[i]`` is the name of sample ``i``'s adapter, or None for the base
    model. Row ``i`` of every output tensor equals, up to float rounding, the
    output of sample ``i`` alone, run with
    ``functional_forward(model, method)((adapters[names[i]], base), ...)``,
    or with ``functional_forward(model)(base, ...)`` for None.

    The batch is dimension 0. Its size is dimension 0 of the first tensor
    argument: ``args`` first, then ``kwargs`` in the order given, each
    searched through tuples, lists and dicts. Every tensor argument whose
    dimension 0 has that size is split by rows. Other arguments, such as a
    position tensor of shape ``(1, seq)``, go unchanged to every sub-batch.
    NOTE: a tensor that is shared by all samples but happens to have the
    batch size in dimension 0 is split as well.

    ``fn`` runs one forward per distinct name, on the rows that name it, and
    puts the output rows back in the input order. This is exact when each
    sample's output depends on that sample's inputs only, which rules out
    batch statistics such as BatchNorm in training mode. The output may be a
    tensor, or tuples, lists, dicts or transformers ``ModelOutput`` objects of
    tensors with the batch in dimension 0, and None.

    Args:
        model: the module to run.
        method: the PEFT method that every adapter in ``adapters`` belongs to.

    Returns:
        ``fn``. Its ``base`` is the base tree, or a tuple or list of disjoint
        trees, without adapter leaves. ``fn`` raises ``ValueError`` if
        ``names`` differs in length from the batch or contains a name that is
        not in ``adapters``, before it runs the model. It raises
        ``TypeError`` for an output that cannot be split into rows, such as a
        transformers cache (pass ``use_cache=False``) or a scalar loss.

    Raises:
        ValueError: if the method does not fit the model, as in
            ``functional_forward``.
    """
    adapted_forward = functional_forward(model, method)
    base_forward = functional_forward(model)

    def fn(
        base: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        adapters: Mapping[str, Mapping[str, Any]],
        names: Sequence[str | None],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        batch_size = _batch_size(args, kwargs)
        if len(names) != batch_size:
            raise ValueError(
                f"names has {len(names)} entries but the batch has {batch_size} rows (dimension 0 of the first "
                "tensor argument); give one adapter name, or None, per sample."
            )
        rows_by_name = _rows_by_name(names, adapters)
        base_trees = list(base) if isinstance(base, (tuple, list)) else [base]

        outputs = []
        for name, rows in rows_by_name.items():
            index = torch.tensor(rows, dtype=torch.long)
            sub_args, sub_kwargs = _take_rows((args, kwargs), index, batch_size)
            if name is None:
                outputs.append(base_forward(base_trees, *sub_args, **sub_kwargs))
            else:
                outputs.append(adapted_forward([adapters[name], *base_trees], *sub_args, **sub_kwargs))

        order = torch.tensor([row for rows in rows_by_name.values() for row in rows], dtype=torch.long)
        inverse = torch.argsort(order)
        sizes = [len(rows) for rows in rows_by_name.values()]
        return _combine_rows(outputs, sizes, inverse, "output")

    return fn


def _batch_size(args: tuple, kwargs: dict) -> int:
    # Keyword arguments in the caller's order: optree would flatten a dict in sorted key order.
    for value in (*args, *kwargs.values()):
        for leaf in optree.tree_leaves(value, none_is_leaf=False):
            if isinstance(leaf, torch.Tensor) and leaf.ndim >= 1:
                return leaf.shape[0]
    raise TypeError(
        "mixed_forward needs at least one tensor argument with the batch in dimension 0, "
        "such as input_ids of shape (batch, seq)."
    )


def _rows_by_name(names: Sequence[str | None], adapters: Mapping[str, Any]) -> dict[str | None, list[int]]:
    """Group row indices by adapter name, in order of each name's first row."""
    rows_by_name: dict[str | None, list[int]] = {}
    for row, name in enumerate(names):
        if name is not None and name not in adapters:
            known = ", ".join(repr(known_name) for known_name in adapters) or "none"
            raise ValueError(
                f"names[{row}] is {name!r}, which is not an adapter name. Known adapters: {known}. "
                "Use None for the base model."
            )
        rows_by_name.setdefault(name, []).append(row)
    return rows_by_name


def _take_rows(arguments: Any, index: torch.Tensor, batch_size: int) -> Any:
    """Select rows ``index`` of every tensor whose dimension 0 is the batch; leave other values as they are."""

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == batch_size:
            return value.index_select(0, index.to(value.device))
        return value

    return optree.tree_map(take, arguments, none_is_leaf=False)


def _combine_rows(parts: list[Any], sizes: list[int], inverse: torch.Tensor, path: str) -> Any:
    """Concatenate the sub-batch outputs along dimension 0 and reorder the rows into input order."""
    first = parts[0]

    if isinstance(first, torch.Tensor):
        for part, size in zip(parts, sizes):
            if not isinstance(part, torch.Tensor) or part.ndim == 0 or part.shape[0] != size:
                shape = tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__
                raise TypeError(
                    f"mixed_forward cannot split {path} into rows: a sub-batch of {size} rows gave {shape}, which has "
                    "no batch in dimension 0. Return per-sample outputs only; compute a loss from the combined output."
                )
        combined = torch.cat(parts)
        return combined.index_select(0, inverse.to(combined.device))

    if first is None:
        if any(part is not None for part in parts):
            raise TypeError(f"mixed_forward: {path} is None for some adapters and not for others.")
        return None

    if isinstance(first, Mapping):
        keys = list(first.keys())
        for part in parts:
            if not isinstance(part, Mapping) or list(part.keys()) != keys:
                raise TypeError(f"mixed_forward: {path} has different fields for different adapters; cannot combine it.")
        merged = {key: _combine_rows([part[key] for part in parts], sizes, inverse, f"{path}[{key!r}]") for key in keys}
        # A transformers ModelOutput is an OrderedDict subclass built from keyword arguments.
        return merged if type(first) is dict else type(first)(**merged)

    if isinstance(first, (tuple, list)):
        if any(type(part) is not type(first) or len(part) != len(first) for part in parts):
            raise TypeError(f"mixed_forward: {path} has different lengths for different adapters; cannot combine it.")
        items = [_combine_rows([part[i] for part in parts], sizes, inverse, f"{path}[{i}]") for i in range(len(first))]
        if hasattr(first, "_fields"):
            return type(first)(*items)
        return type(first)(items)

    raise TypeError(
        f"mixed_forward cannot split {path} of type {type(first).__name__} into rows; only tensors with the batch in "
        "dimension 0, and tuples, lists, dicts and ModelOutputs of them, can be combined. For a transformers model, "
        "pass use_cache=False so that the output contains no cache."
    )

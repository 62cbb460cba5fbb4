"""Building modules whose parameters live on the ``meta`` device while their buffers stay real."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["parameters_on_meta"]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Put every parameter registered inside the block on the ``meta`` device; buffers stay real.

    ``nn.Module.register_parameter`` (which ``module.weight = Parameter(...)``
    also goes through) is patched for the duration of the block, so each
    parameter is replaced by a meta tensor of the same class, shape and dtype
    as soon as it is registered. Initialisers that run afterwards touch meta
    tensors only. Buffers are untouched, so non-persistent ones that no
    checkpoint contains (BERT's ``position_ids``, Llama's rotary ``inv_freq``)
    keep the values the module computed for them.

    NOTE: a layer's constructor still allocates its parameter with
    ``torch.empty`` before registering it. That memory is freed at once and,
    being uninitialised, is never written, so the peak stays about one layer.
    The patch is process-wide while the block runs, so do not build modules
    in other threads meanwhile.
    """
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]

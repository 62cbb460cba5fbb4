"""The interface every PEFT method implements, and what it hands the forward."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..maps import StateMap
from ..tree import Tree, split

__all__ = ["PeftMethod", "WeightAdapter", "split_trainable"]


class WeightAdapter(abc.ABC):
    """The change one method makes to one base weight while the model runs.

    The forward wrapper calls the adapter for the low-rank output of
    ``F.linear`` or a convolution when it can (no dense update is built), and
    for the materialised weight everywhere else.
    """

    #: Path of the module that owns the weight; its ``training`` flag switches dropout.
    module: str
    #: True when the weight is stored as ``(in, out)`` and used as ``x @ W``
    #: (transformers' Conv1D); then ``linear_delta`` serves ``addmm`` and
    #: ``matmul`` instead of ``F.linear``.
    transposed: bool = False
    #: True when ``add_to_output`` needs the base output without the bias
    #: (DoRA rescales ``W x``); the forward then adds the bias after the adapters.
    needs_output_without_bias: bool = False

    @abc.abstractmethod
    def materialise(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the adapted weight as one dense tensor of the base weight's shape and dtype."""

    @property
    def output_bias(self) -> torch.Tensor | None:
        """Return a bias the adapter adds to the op's output (over the output channel dim), or None.

        The forward adds it after ``F.linear`` or a convolution that falls
        back to the materialised weight, since no weight can carry it.
        """
        return None

    def linear_delta(self, x: torch.Tensor, training: bool) -> torch.Tensor | None:
        """Return what the adapter adds to ``F.linear(x, weight, bias)`` (or to ``x @ weight`` when transposed), or None.

        None means the adapter has no unmerged rule and the forward falls
        back to the materialised weight.
        """
        return None

    def conv_add(self, func, x, output, stride, padding, dilation, groups, training) -> torch.Tensor | None:
        """Return ``output`` (the convolution's result) plus this adapter's part, or None to fall back.

        ``func`` is the convolution (``F.conv1d``, ``F.conv2d`` or ``F.conv3d``) and the other
        arguments are the ones the model passed to it. The default has no
        unmerged rule, so the forward uses the materialised kernel.
        """
        return None

    def lookup_add(self, ids: torch.Tensor, output: torch.Tensor, padding_idx: int | None, scale_grad_by_freq: bool, sparse: bool) -> torch.Tensor | None:
        """Return ``output`` (``F.embedding`` of ``ids`` in the base table) plus this adapter's rows, or None to fall back.

        ``padding_idx`` is already non-negative. The default has no unmerged
        rule, so the forward looks the ids up in the materialised table.
        """
        return None

    def transposed_view(self) -> WeightAdapter | None:
        """Return the adapter of the 2-D view ``W.t()``, or None to fall back.

        With an adapter for the view, ``x @ W.t()`` runs unmerged; None makes
        the view carry the materialised weight instead.
        """
        return None

    def expert(self, index: Any) -> WeightAdapter | None:
        """Return the adapter of the 2-D view ``W[index]`` of a 3-D expert stack, or None to fall back.

        ``index`` is an int or a 0-d integer tensor. With an adapter per
        expert, ``F.linear(x, W[e])`` runs unmerged; None makes the view carry
        the materialised stack instead.
        """
        return None

    def add_to_output(self, x: torch.Tensor, output: torch.Tensor, training: bool) -> torch.Tensor | None:
        """Return ``output`` (the base op's result) plus this adapter's part, or None to fall back.

        The default adds ``linear_delta``; an adapter may fuse the
        addition into its last matmul.
        """
        delta = self.linear_delta(x, training)
        return None if delta is None else output + delta.to(output.dtype)


class PeftMethod(abc.ABC):
    """A PEFT method as pure functions over flat trees.

    No method mutates its inputs: each returns a new dict, and the leaves it
    does not change are the caller's own tensor objects. A tree may hold
    tensors or ``TensorSpec`` leaves; with specs, methods plan
    (check targets, return shapes) and allocate nothing.
    """

    config: Any

    @abc.abstractmethod
    def inject(self, params: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tree:
        """Return a new tree with every base key unchanged plus this method's adapter leaves.

        Args:
            params: the base tree (tensors or specs), keyed as ``state_dict()``.
            generator: the random generator used to initialise adapter leaves.

        Raises:
            ValueError: if a pattern matches no module, or a matched module
                cannot be adapted; the message names the pattern or module.
        """

    @abc.abstractmethod
    def adapter_keys(self, tree: Mapping[str, Any]) -> set[str]:
        """Return the keys of the leaves this method adds to ``tree``'s base keys.

        The result is the same for the base tree and for the injected tree.
        """

    @abc.abstractmethod
    def trainable_keys(self, tree: Mapping[str, Any]) -> set[str]:
        """Return the keys of ``tree`` that training updates; every other key stays frozen."""

    @abc.abstractmethod
    def merge(self, tree: Mapping[str, Any]) -> Tree:
        """Return a tree with the base keys only, the adapters folded into the base leaves."""

    @abc.abstractmethod
    def unmerge(self, merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> Tree:
        """Invert ``merge``: return the adapted tree from a merged tree and the adapter leaves.

        ``unmerge(merge(tree), adapter)`` restores ``tree`` within the base
        dtype's rounding.
        """

    @abc.abstractmethod
    def merge_map(self) -> StateMap:
        """Return the merge as an invertible map that keeps the adapter leaves.

        The map shears each adapted weight (``W -> W + dW``) and passes every
        other key through, so it composes with key and layout maps. Its
        inverse is the unmerge. Follow it with ``Drop`` of the adapter keys
        to get what ``merge`` returns.
        """

    @abc.abstractmethod
    def bind_forward(self, spec: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, list[WeightAdapter]]]:
        """Plan the forward once for a base spec; return a function that binds a tree's leaves.

        The returned function takes an adapted tree with the keys planned here
        and returns, for each base weight key the method changes, how to
        change it. It only looks up keys, so it traces cleanly under
        ``torch.compile``, ``vmap`` and ``grad``.
        """

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise ``ValueError`` if the config does not fit the model's modules; the default checks nothing."""

    def weight_adapters(self, tree: Mapping[str, Any]) -> dict[str, list[WeightAdapter]]:
        """Return, for each base weight key the method changes, how to change it in the forward."""
        return self.bind_forward(tree)(tree)


def split_trainable(method: PeftMethod, tree: Mapping[str, Any]) -> tuple[Tree, Tree]:
    """Split ``tree`` into ``(trainable, frozen)`` by ``method.trainable_keys``.

    Frozen is everything else: base weights, norms, embeddings and biases
    stay frozen unless the method names them.

    Example:
        >>> trainable, frozen = split_trainable(method, method.inject(params))
        >>> grads = torch.func.grad(loss)(trainable, frozen, batch)
    """
    return split(tree, method.trainable_keys(tree))

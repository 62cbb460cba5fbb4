"""LoRA's per-weight adapters for the forward, with the unmerged rule of each layout."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from ._lora_layout import LoRATarget, add_delta, dora_weight, expert_factors, merge_bias, target_delta
from .base import WeightAdapter

def _splits_vocabulary(lora_a: torch.Tensor) -> bool:
    """Return whether an embedding's A is a DTensor split along the vocabulary (its dim 1).

    NOTE: torch 2.13's DTensor fails to multiply the rows looked up in such a
    split table by a replicated matrix (an IndexError on a mask shape), so
    those tables use the materialised update instead.
    """
    placements = getattr(lora_a, "placements", None)
    return placements is not None and any(getattr(placement, "dim", None) in (1, -1) for placement in placements)


class _LoRAWeight(WeightAdapter):
    def __init__(
        self,
        target: LoRATarget,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        dropout: float,
        lora_bias: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ):
        self.target = target
        self.module = target.module
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self.dropout = dropout
        self.transposed = target.transposed
        # Set only when the base module has no bias of its own to carry the LoRA bias.
        self.lora_bias = lora_bias
        self.magnitude = magnitude
        # DoRA's unmerged forward needs the base weight for its norm.
        self.weight = weight
        # DoRA rescales W x, so the forward passes the base output without its bias.
        self.needs_output_without_bias = magnitude is not None

    def materialise(self, weight: torch.Tensor) -> torch.Tensor:
        delta = target_delta(self.target, self.lora_a, self.lora_b, self.scale, weight.dtype)
        if self.magnitude is None:
            return add_delta(weight, delta)
        return dora_weight(self.target, weight, delta, self.magnitude)

    def _low_rank_input(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        hidden = x if x.dtype == self.lora_a.dtype else x.to(self.lora_a.dtype)
        if training and self.dropout > 0:
            hidden = F.dropout(hidden, self.dropout, training=True)
        return hidden

    def _low_rank(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        return F.linear(self._low_rank_input(x, training), self.lora_a)

    def linear_delta(self, x: torch.Tensor, training: bool) -> torch.Tensor | None:
        if self.target.kind != "linear" or self.magnitude is not None:
            return None
        # Scaling the rank-r intermediate costs r multiplies per row instead of out.
        bias = None if self.lora_bias is None else self.lora_bias * self.scale
        return F.linear(self._low_rank(x, training) * self.scale, self.lora_b, bias)

    def add_to_output(self, x: torch.Tensor, output: torch.Tensor, training: bool) -> torch.Tensor | None:
        if self.target.kind != "linear":
            return None
        if self.magnitude is not None:
            return self._dora_output(x, output, training)
        if self.lora_bias is not None or output.dtype != self.lora_b.dtype:
            return output + self.linear_delta(x, training).to(output.dtype)
        low = self._low_rank(x, training)
        # One addmm computes output + s * low @ B^T, with no separate scale or add.
        # NOTE: output.add(F.linear(low, B), alpha=s) would save the reshapes, but
        # torch 2.13's inductor compiles add(mm, alpha=k) to wrong values on CPU.
        rows = torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_b.t(), alpha=self.scale)
        return rows.view(output.shape)

    def _dora_output(self, x: torch.Tensor, output: torch.Tensor, training: bool) -> torch.Tensor:
        """Return ``(m / n) * (W x + s B A x)`` from ``output = W x`` (without the bias).

        With dropout d active it returns ``W x + (m / n - 1) W d(x) + (m / n) s B A d(x)``,
        as Hugging Face PEFT computes it: only the adapter's share receives the dropped input.
        """
        hidden = self._low_rank_input(x, training)
        low_rank = F.linear(F.linear(hidden, self.lora_a), self.lora_b) * self.scale
        factor = (self.magnitude / self._row_norms()).to(low_rank.dtype)
        if not (training and self.dropout > 0):
            return (factor * (output.to(low_rank.dtype) + low_rank)).to(output.dtype)
        base_on_dropped = F.linear(hidden.to(self.weight.dtype), self.weight).to(low_rank.dtype)
        return output + ((factor - 1) * base_on_dropped + factor * low_rank).to(output.dtype)

    def _row_norms(self) -> torch.Tensor:
        """Return ``||W + s B A||`` per output row without building the dense update.

        ``||W_i + s (BA)_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 <B_i, (B A A^T)_i>``
        costs two products with the rank-r factors instead of an (out, in) temporary.
        """
        with torch.no_grad():
            weight = self.weight.detach().to(torch.float32)
            lora_a, lora_b = self.lora_a.detach().to(torch.float32), self.lora_b.detach().to(torch.float32)
            squares = weight.square().sum(1) + 2 * self.scale * (lora_b * (weight @ lora_a.T)).sum(1)
            squares = squares + self.scale**2 * (lora_b * (lora_b @ (lora_a @ lora_a.T))).sum(1)
            return squares.clamp_min(0).sqrt()

    def conv_add(self, func, x, output, stride, padding, dilation, groups, training) -> torch.Tensor | None:
        if self.target.kind != "conv" or groups != 1 or self.magnitude is not None:
            return None
        # conv(conv(x, A), B) with B a 1x1 kernel equals conv(x, B A), the kernel update merge adds.
        low = func(self._low_rank_input(x, training), self.lora_a, None, stride, padding, dilation, 1)
        output = output + (func(low, self.lora_b) * self.scale).to(output.dtype)
        bias = self.output_bias
        return output if bias is None else output + bias.view(-1, *(1,) * (output.dim() - 2)).to(output.dtype)

    @property
    def output_bias(self) -> torch.Tensor | None:
        """Return ``s * lora_bias`` when the module has no bias leaf to carry it, else None."""
        return None if self.lora_bias is None else self.lora_bias * self.scale

    def lookup_add(self, ids: torch.Tensor, output: torch.Tensor, padding_idx: int | None, scale_grad_by_freq: bool, sparse: bool) -> torch.Tensor | None:
        if self.target.kind != "embedding" or self.magnitude is not None or _splits_vocabulary(self.lora_a):
            return None
        # Row i of the update (B A)^T is A[:, i] looked up, times B^T: no (num_embeddings, dim) temporary.
        low = F.embedding(ids, self.lora_a.t(), padding_idx, None, 2.0, scale_grad_by_freq, sparse)
        delta = (low @ self.lora_b.t()) * self.scale
        if padding_idx is not None:
            # The padding row of the adapted table gets no gradient, as F.embedding treats it.
            padding = (ids == padding_idx).unsqueeze(-1)
            delta = torch.where(padding, delta.detach(), delta)
        return output + delta.to(output.dtype)

    def transposed_view(self) -> _LoRAWeight | None:
        """Return the adapter of the view ``W.t()`` of a linear weight: the same leaves in the other layout."""
        if self.target.kind != "linear":
            return None
        target = dataclasses.replace(self.target, transposed=not self.target.transposed)
        weight = None if self.weight is None else self.weight.t()
        return _LoRAWeight(target, self.lora_a, self.lora_b, self.scale, self.dropout, self.lora_bias, self.magnitude, weight)

    def expert(self, index: Any) -> "_LoRAWeight":
        """Return the adapter of one expert, for the 2-D view ``W[index]`` of an expert stack."""
        per_expert_a, per_expert_b = expert_factors(self.lora_a, self.lora_b, self.target.experts)
        target = dataclasses.replace(self.target, kind="linear")
        return _LoRAWeight(target, per_expert_a[index], per_expert_b[index], self.scale, self.dropout)


class _LoRABias(WeightAdapter):
    """The LoRA bias as a change of the module's own bias leaf: ``b -> b + s * b_lora``."""

    def __init__(self, module: str, lora_bias: torch.Tensor, scale: float):
        self.module = module
        self.lora_bias = lora_bias
        self.scale = scale

    def materialise(self, weight: torch.Tensor) -> torch.Tensor:
        return merge_bias(weight, self.lora_bias, self.scale, weight.dtype)

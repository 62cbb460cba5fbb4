"""LoRA's layouts and update math: shapes of the adapter leaves, the update dW, merging and DoRA's norms.

The method (``lora.py``), its forward adapters (``_lora_forward.py``) and the
merge map all compute through these functions, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

__all__ = [
    "LoRATarget",
    "adapter_dtype",
    "adapter_shapes",
    "add_delta",
    "dora_norm",
    "dora_weight",
    "expert_factors",
    "lora_delta",
    "magnitude_shape",
    "merge_bias",
    "merge_weight",
    "target_delta",
    "target_features",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def lora_delta(
    lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, base_dtype: torch.dtype, *, transposed: bool = False
) -> torch.Tensor:
    """Return ``scale * B @ A`` (or its transpose) in at least float32 precision.

    Merge, unmerge and the forward's materialised weight all call this one
    function, so they cannot drift apart. ``transposed`` gives the update in
    the (in, out) layout of a weight stored as transformers' Conv1D stores it.
    """
    compute = torch.promote_types(base_dtype, torch.float32)
    if lora_a.dim() > 2:
        # A convolution: B is a 1x1 kernel, so the update is B (out, r) times A flattened over (in, kernel).
        flat = lora_b.to(compute).flatten(1) @ lora_a.to(compute).flatten(1)
        return flat.view(lora_b.shape[0], *lora_a.shape[1:]) * scale
    delta = (lora_b.to(compute) @ lora_a.to(compute)) * scale
    return delta.T if transposed else delta


def add_delta(weight: torch.Tensor, delta: torch.Tensor, *, sign: int = 1) -> torch.Tensor:
    """Return ``weight + sign * delta``, added in the delta's precision and rounded once to the weight's dtype."""
    total = weight.to(delta.dtype) + delta if sign > 0 else weight.to(delta.dtype) - delta
    return total.to(weight.dtype)


# Rows merged per block: a block's float32 copy stays near 2 MB, small enough for the CPU cache.
_MERGE_BLOCK_ELEMENTS = 1 << 19


def merge_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *, transposed: bool = False, sign: int = 1
) -> torch.Tensor:
    """Return ``weight + sign * scale * B @ A`` (transposed when asked), computed in at least float32 and rounded once.

    When no gradient is needed the merge runs over blocks of rows: each block
    is copied to float32, updated in place with one ``addmm_`` and rounded
    into the new tensor, so no full-size float32 temporary exists. The fused
    ``addmm_`` can round the float32 sum differently in the last bit from
    ``add_delta(weight, lora_delta(...))``, which the forward's materialised
    weight uses.
    """
    needs_graph = torch.is_grad_enabled() and (weight.requires_grad or lora_a.requires_grad or lora_b.requires_grad)
    plain = type(weight) is torch.Tensor and type(lora_a) is torch.Tensor and type(lora_b) is torch.Tensor
    if not plain and not needs_graph and "torch.distributed.tensor" in sys.modules:
        from ..distributed._merge import merge_local  # DTensors: the same blocked merge on each rank's shards

        merged = merge_local(weight, lora_a, lora_b, scale, transposed=transposed, sign=sign)
        if merged is not None:
            return merged
    if needs_graph or not plain or torch._C._are_functorch_transforms_active() or weight.device.type == "meta" or weight.dim() != 2:
        return add_delta(weight, lora_delta(lora_a, lora_b, scale, weight.dtype, transposed=transposed), sign=sign)

    compute = torch.promote_types(weight.dtype, torch.float32)
    # Row i of W gets row i of B @ A, or in the (in, out) layout row i of A^T @ B^T.
    left, right = (lora_a.t(), lora_b.t()) if transposed else (lora_b, lora_a)
    left, right = left.to(compute), right.to(compute)
    merged = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    rows = max(1, _MERGE_BLOCK_ELEMENTS // max(weight.shape[1], 1))
    with torch.no_grad():
        for start in range(0, weight.shape[0], rows):
            block = weight[start : start + rows].to(compute, copy=True)
            block.addmm_(left[start : start + rows], right, alpha=sign * scale)
            merged[start : start + rows].copy_(block)
    return merged


def _weight_key(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _leaf_key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


@dataclasses.dataclass(frozen=True)
class LoRATarget:
    """One weight that LoRA adapts: its key, its layout and the keys of its adapter leaves.

    ``kind`` is ``"linear"`` (a 2-D weight used by ``F.linear``, or by
    ``x @ W`` when ``transposed``), ``"conv"`` (a Conv1d/2d/3d kernel),
    ``"embedding"`` (a table used by ``F.embedding``) or ``"experts"`` (a
    3-D stack of expert weights).
    """

    #: The module path for a module target, the parameter key for a parameter target.
    name: str
    weight_key: str
    kind: str
    transposed: bool
    #: Path of the module that owns the weight; its ``training`` flag switches dropout.
    module: str
    #: Number of experts E for an ``"experts"`` target, else 0.
    experts: int = 0

    def leaf(self, leaf_name: str) -> str:
        """Return the tree key of one of this target's adapter leaves."""
        return _leaf_key(self.name, leaf_name)

    @property
    def key_a(self) -> str:
        return self.leaf("lora_embedding_A" if self.kind == "embedding" else "lora_A")

    @property
    def key_b(self) -> str:
        return self.leaf("lora_embedding_B" if self.kind == "embedding" else "lora_B")

    @property
    def key_magnitude(self) -> str:
        return self.leaf("lora_magnitude_vector")

    @property
    def key_norm(self) -> str:
        return self.leaf("lora_weight_norm")

    @property
    def key_lora_bias(self) -> str:
        return self.leaf("lora_bias")

    @property
    def bias_key(self) -> str:
        return _leaf_key(self.module, "bias")


def target_features(target: LoRATarget, shape: tuple[int, ...]) -> tuple[int, int]:
    """Return ``(out_features, in_features)`` of a weight of ``shape`` in the target's layout.

    For an embedding table ``(num_embeddings, embedding_dim)`` the output
    size is ``embedding_dim`` and the input size ``num_embeddings``; for
    experts they are the sizes of one expert's weight.
    """
    if target.kind == "embedding":
        return shape[1], shape[0]
    if target.kind == "experts":
        return (shape[2], shape[1]) if target.transposed else (shape[1], shape[2])
    return (shape[1], shape[0]) if target.transposed else (shape[0], shape[1])


def adapter_shapes(target: LoRATarget, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return the shapes of the A and B leaves for a weight of ``shape`` and rank ``rank``."""
    out_features, in_features = target_features(target, shape)
    if target.kind == "experts":
        experts = shape[0]
        return (experts * rank, in_features), (out_features, experts * rank)
    if target.kind == "conv":
        kernel = tuple(shape[2:])
        return (rank, shape[1], *kernel), (shape[0], rank, *(1,) * len(kernel))
    return (rank, in_features), (out_features, rank)


def magnitude_shape(target: LoRATarget, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the shape of the DoRA magnitude: one value per output row, ``(1, out, 1, ...)`` for kernels."""
    out_features = target_features(target, shape)[0]
    if target.kind == "conv":
        return (1, out_features, *(1,) * (len(shape) - 2))
    return (out_features,)


def target_delta(target: LoRATarget, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, base_dtype: torch.dtype) -> torch.Tensor:
    """Return the update ``dW`` in the base weight's layout, in at least float32."""
    compute = torch.promote_types(base_dtype, torch.float32)
    if target.kind == "embedding":
        return ((lora_b.to(compute) @ lora_a.to(compute)) * scale).T
    if target.kind == "experts":
        per_expert_a, per_expert_b = expert_factors(lora_a.to(compute), lora_b.to(compute), target.experts)
        delta = torch.bmm(per_expert_b, per_expert_a) * scale
        return delta.transpose(1, 2) if target.transposed else delta
    return lora_delta(lora_a, lora_b, scale, base_dtype, transposed=target.transposed)


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unpack expert LoRA leaves into ``(E, r, in)`` and ``(E, out, r)`` views.

    A packs the experts' rows one expert after another; B packs its columns
    rank by rank, so expert e owns columns ``e, e + E, e + 2E, ...``. This is
    Hugging Face PEFT's ``target_parameters`` packing (checked against peft 0.21.2).
    """
    rank = lora_a.shape[0] // experts
    per_expert_a = lora_a.view(experts, rank, lora_a.shape[1])
    per_expert_b = lora_b.view(lora_b.shape[0], rank, experts).permute(2, 0, 1)
    return per_expert_a, per_expert_b


def _norm_dims(target: LoRATarget, ndim: int) -> tuple[int, ...]:
    """Return the dims of the weight that DoRA's norm reduces: all but the output dim."""
    if target.kind == "embedding" or target.transposed:
        return (0,)
    return tuple(range(1, ndim))


def dora_norm(target: LoRATarget, adapted: torch.Tensor) -> torch.Tensor:
    """Return the detached norms of ``W + dW`` per output row, shaped to broadcast against the weight."""
    with torch.no_grad():
        return torch.linalg.vector_norm(adapted.detach(), dim=_norm_dims(target, adapted.dim()), keepdim=True)


def dora_weight(target: LoRATarget, weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Return DoRA's adapted weight ``(m / ||W + dW||) * (W + dW)``, computed in ``delta``'s dtype and rounded once to ``weight``'s."""
    adapted = weight.to(delta.dtype) + delta
    factor = _magnitude_like(target, magnitude, weight.dim()).to(delta.dtype) / dora_norm(target, adapted)
    return (factor * adapted).to(weight.dtype)


def _magnitude_like(target: LoRATarget, magnitude: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a DoRA magnitude to broadcast against the weight."""
    if target.kind == "embedding" or target.transposed:
        return magnitude.reshape(1, -1)
    return magnitude.reshape(-1, *(1,) * (ndim - 1))


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of new adapter leaves: float32 for half-precision bases, else the base dtype."""
    return torch.float32 if base_dtype in _HALF_DTYPES else base_dtype


def merge_bias(bias: torch.Tensor | None, lora_bias: torch.Tensor, scale: float, dtype: torch.dtype, *, sign: int = 1) -> torch.Tensor:
    """Return ``bias + sign * scale * lora_bias`` in at least float32, rounded once; a missing bias counts as zero."""
    compute = torch.promote_types(dtype, torch.float32)
    update = lora_bias.to(compute) * (sign * scale)
    total = update if bias is None else bias.to(compute) + update
    return total.to(dtype)

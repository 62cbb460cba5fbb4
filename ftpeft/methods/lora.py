"""LoRA: ``W' = W + s * B @ A`` on the linear and convolution weights of matched modules."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..maps import Group, StateMap
from ..tree import TensorSpec, Tree, is_spec, module_paths
from ._patterns import match_modules
from .base import PeftMethod, WeightAdapter
from .config import LoRAConfig

__all__ = ["LoRA", "LoRAMergeMap", "add_delta", "lora_delta", "merge_bias", "merge_weight"]

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


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Return the dtype of new adapter leaves: float32 for half-precision bases, else the base dtype."""
    return torch.float32 if base_dtype in _HALF_DTYPES else base_dtype


def _weight_key(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _leaf_key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


class _LoRAWeight(WeightAdapter):
    def __init__(
        self,
        module: str,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scale: float,
        dropout: float,
        transposed: bool,
        lora_bias: torch.Tensor | None = None,
    ):
        self.module = module
        self.lora_a = lora_a
        self.lora_b = lora_b
        self.scale = scale
        self.dropout = dropout
        self.transposed = transposed
        # Set only when the base module has no bias of its own to carry the LoRA bias.
        self.lora_bias = lora_bias

    def materialise(self, weight: torch.Tensor) -> torch.Tensor:
        return add_delta(weight, lora_delta(self.lora_a, self.lora_b, self.scale, weight.dtype, transposed=self.transposed))

    def _low_rank_input(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        hidden = x if x.dtype == self.lora_a.dtype else x.to(self.lora_a.dtype)
        if training and self.dropout > 0:
            hidden = F.dropout(hidden, self.dropout, training=True)
        return hidden

    def _low_rank(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        return F.linear(self._low_rank_input(x, training), self.lora_a)

    def linear_delta(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        # Scaling the rank-r intermediate costs r multiplies per row instead of out.
        bias = None if self.lora_bias is None else self.lora_bias * self.scale
        return F.linear(self._low_rank(x, training) * self.scale, self.lora_b, bias)

    def add_to_output(self, x: torch.Tensor, output: torch.Tensor, training: bool) -> torch.Tensor:
        if self.lora_bias is not None or output.dtype != self.lora_b.dtype:
            return output + self.linear_delta(x, training).to(output.dtype)
        low = self._low_rank(x, training)
        # One addmm computes output + s * low @ B^T, with no separate scale or add.
        # NOTE: output.add(F.linear(low, B), alpha=s) would save the reshapes, but
        # torch 2.13's inductor compiles add(mm, alpha=k) to wrong values on CPU.
        rows = torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_b.t(), alpha=self.scale)
        return rows.view(output.shape)

    def conv_add(self, func, x, output, stride, padding, dilation, groups, training) -> torch.Tensor | None:
        if groups != 1 or self.lora_bias is not None:
            return None
        # conv(conv(x, A), B) with B a 1x1 kernel equals conv(x, B A), the kernel update merge adds.
        low = func(self._low_rank_input(x, training), self.lora_a, None, stride, padding, dilation, 1)
        return output + (func(low, self.lora_b) * self.scale).to(output.dtype)


class _LoRABias(WeightAdapter):
    """The LoRA bias as a change of the module's own bias leaf: ``b -> b + s * b_lora``."""

    def __init__(self, module: str, lora_bias: torch.Tensor, scale: float):
        self.module = module
        self.lora_bias = lora_bias
        self.scale = scale

    def materialise(self, weight: torch.Tensor) -> torch.Tensor:
        return merge_bias(weight, self.lora_bias, self.scale, weight.dtype)


def merge_bias(bias: torch.Tensor | None, lora_bias: torch.Tensor, scale: float, dtype: torch.dtype, *, sign: int = 1) -> torch.Tensor:
    """Return ``bias + sign * scale * lora_bias`` in at least float32, rounded once; a missing bias counts as zero."""
    compute = torch.promote_types(dtype, torch.float32)
    update = lora_bias.to(compute) * (sign * scale)
    total = update if bias is None else bias.to(compute) + update
    return total.to(dtype)


class LoRA(PeftMethod):
    """LoRA on the floating-point ``weight`` of every matched module: linear or convolution kernel.

    For a weight ``W`` of shape ``(out, in)``, ``inject`` adds
    ``<module>.lora_A`` of shape ``(r, in)`` and ``<module>.lora_B`` of shape
    ``(out, r)``. The adapted weight is ``W + s * B @ A`` with
    ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. A starts
    kaiming-uniform (or gaussian) and B at zero, so a fresh adapter changes
    nothing. Adapter leaves are float32 when the base weight is float16 or
    bfloat16, and take the base weight's dtype otherwise. With
    ``fan_in_fan_out`` the weight is stored as ``(in, out)`` and the update
    added to it is transposed. ``rank_pattern`` and ``alpha_pattern`` set r
    and alpha per module. With ``lora_bias``, ``<module>.lora_bias`` of shape
    ``(out,)`` adds ``s * lora_bias`` to the module's output.
    """

    def __init__(self, config: LoRAConfig):
        self.config = config

    def _features(self, weight: Any) -> tuple[int, int]:
        """Return ``(out_features, in_features)`` of a weight in this config's layout."""
        first, second = weight.shape[:2]
        return (second, first) if self.config.params.fan_in_fan_out else (first, second)

    def _adapter_shapes(self, weight: Any, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Return the shapes of A and B for a weight: 2-D for linear layouts, kernels for convolutions."""
        out_features, in_features = self._features(weight)
        kernel = tuple(weight.shape[2:])
        return (rank, in_features, *kernel), (out_features, rank, *(1,) * len(kernel))

    def targets(self, tree: Mapping[str, Any]) -> list[str]:
        """Return the paths of the modules this method adapts in ``tree``.

        Candidates are the modules that own a ``weight`` leaf; the pattern is
        matched against their paths.

        Raises:
            ValueError: if a pattern matches no candidate, or a matched
                module's weight is neither 2-D nor a 3-D to 5-D kernel, or not floating point.
        """
        candidates = [m for m in module_paths(tree) if _weight_key(m) in tree]
        matched = match_modules(self.config.module_name_pattern, candidates, method="LoRA")
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self.config, field):
                if not match_modules([key], matched, method=f"LoRA {field}", quiet=True):
                    raise ValueError(
                        f"LoRA {field} key {key!r} matches none of the targeted modules "
                        f"({', '.join(matched[:4])}{', ...' if len(matched) > 4 else ''}); fix or remove it."
                    )
        for module in matched:
            weight = TensorSpec.of(tree[_weight_key(module)])
            # 3-D weights are Conv1d kernels here; 3-D expert weights will need their own targeting.
            convolution = weight.ndim in (3, 4, 5) and not self.config.params.fan_in_fan_out
            if not (weight.ndim == 2 or convolution) or not weight.dtype.is_floating_point:
                raise ValueError(
                    f"LoRA cannot adapt module {module!r}: its weight has shape {weight.shape} and dtype "
                    f"{weight.dtype}, but LoRA here needs a floating-point weight that is 2-D (used by F.linear) "
                    "or 3-D to 5-D (a Conv1d, Conv2d or Conv3d kernel). "
                    "Narrow module_name_pattern so that it leaves this module out."
                )
        return matched

    def check_model(self, model: torch.nn.Module) -> None:
        from ..tree import spec_of

        fan_in_fan_out = self.config.params.fan_in_fan_out
        for module in self.targets(spec_of(model)):
            layer = model.get_submodule(module)
            # transformers' Conv1D stores its weight (in, out); it is recognised by name to avoid importing transformers.
            is_conv1d = type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")
            if is_conv1d and not fan_in_fan_out:
                raise ValueError(
                    f"LoRA target {module!r} is a Conv1D, whose weight is stored as (in, out), but the config has "
                    "fan_in_fan_out=False. Set LoRAParameters(fan_in_fan_out=True) for these modules."
                )
            if isinstance(layer, torch.nn.Linear) and fan_in_fan_out:
                raise ValueError(
                    f"LoRA target {module!r} is an nn.Linear, whose weight is stored as (out, in), but the config has "
                    "fan_in_fan_out=True. Set LoRAParameters(fan_in_fan_out=False) for these modules."
                )

    def adapter_keys(self, tree: Mapping[str, Any]) -> set[str]:
        keys: set[str] = set()
        for module in self.targets(tree):
            keys.add(_leaf_key(module, "lora_A"))
            keys.add(_leaf_key(module, "lora_B"))
            if self.config.params.lora_bias:
                keys.add(_leaf_key(module, "lora_bias"))
        return keys

    def trainable_keys(self, tree: Mapping[str, Any]) -> set[str]:
        keys = self.adapter_keys(tree)
        self._require(tree, keys, "train")
        return keys

    def inject(self, params: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tree:
        planning = is_spec(params)
        targets = self.targets(params)
        already = sorted(k for k in self.adapter_keys(params) if k in params)
        if already:
            raise ValueError(
                f"The tree already contains LoRA leaves ({', '.join(already[:3])}, ...). inject takes the base "
                "tree; to stack two LoRAs on one module use separate trees, or merge the first one before injecting."
            )

        adapted: Tree = dict(params)
        for module in targets:
            weight = TensorSpec.of(params[_weight_key(module)])
            out_features, in_features = self._features(weight)
            rank = self.config.rank_of(module)
            dtype = adapter_dtype(weight.dtype)
            shape_a, shape_b = self._adapter_shapes(weight, rank)
            spec_a = TensorSpec(shape_a, dtype, weight.device, adapter=True)
            spec_b = TensorSpec(shape_b, dtype, weight.device, adapter=True)
            if planning:
                adapted[_leaf_key(module, "lora_A")] = spec_a
                adapted[_leaf_key(module, "lora_B")] = spec_b
            elif self.config.params.init in ("pissa", "olora") and weight.device.type != "meta":
                if weight.ndim != 2:
                    raise ValueError(
                        f"LoRA init {self.config.params.init!r} needs a 2-D weight, but {module!r} has shape "
                        f"{weight.shape}; use init='kaiming_uniform' or 'gaussian' for convolutions."
                    )
                residual, lora_a, lora_b = self._decompose(module, params[_weight_key(module)], rank, dtype)
                adapted[_weight_key(module)] = residual
                adapted[_leaf_key(module, "lora_A")] = lora_a
                adapted[_leaf_key(module, "lora_B")] = lora_b
            else:
                adapted[_leaf_key(module, "lora_A")] = self._init_a(spec_a, rank, generator)
                adapted[_leaf_key(module, "lora_B")] = torch.zeros(spec_b.shape, dtype=dtype, device=weight.device)
            if self.config.params.lora_bias:
                spec_bias = TensorSpec((out_features,), dtype, weight.device, adapter=True)
                adapted[_leaf_key(module, "lora_bias")] = (
                    spec_bias if planning else torch.zeros(spec_bias.shape, dtype=dtype, device=weight.device)
                )
        if not planning and "torch.distributed.tensor" in sys.modules:
            # Only then can the tree hold DTensors; their adapters become DTensors placed to match.
            from ..distributed import distribute_adapters

            adapted = distribute_adapters(self, adapted)
        return adapted

    def _decompose(
        self, module: str, weight: torch.Tensor, rank: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(W - s * B @ A, A, B)`` for the PiSSA or OLoRA initialisation of one weight."""
        scale = self.config.scale_of(module)
        transposed = self.config.params.fan_in_fan_out
        matrix = weight.detach().to(torch.float32)
        matrix = matrix.T if transposed else matrix
        if self.config.params.init == "pissa":
            left, singular, right = torch.linalg.svd(matrix, full_matrices=False)
            root = torch.sqrt(singular[:rank] / scale)
            lora_a = root[:, None] * right[:rank]
            lora_b = left[:, :rank] * root[None, :]
        else:
            orthogonal, upper = torch.linalg.qr(matrix)
            lora_a, lora_b = upper[:rank], orthogonal[:, :rank]
        if lora_a.shape[0] < rank:
            raise ValueError(
                f"LoRA init {self.config.params.init!r} on {module!r} needs r <= min(out, in); the weight has shape "
                f"{tuple(weight.shape)} and r={rank}."
            )
        residual = merge_weight(weight.detach(), lora_a, lora_b, scale, transposed=transposed, sign=-1)
        return residual, lora_a.to(dtype).contiguous(), lora_b.to(dtype).contiguous()

    def _init_a(self, spec: TensorSpec, rank: int, generator: torch.Generator | None) -> torch.Tensor:
        if spec.device.type == "meta":
            return torch.empty(spec.shape, dtype=spec.dtype, device="meta")

        # Draw on the generator's device in float32, so a seed gives the same
        # values whatever the base dtype and device.
        draw_device = generator.device if generator is not None else spec.device
        values = torch.empty(spec.shape, dtype=torch.float32, device=draw_device)
        if self.config.params.init == "gaussian":
            values.normal_(0.0, 1.0 / rank, generator=generator)
        else:
            # kaiming_uniform with a = sqrt(5) gives the bound 1 / sqrt(fan_in), fan_in = in times the kernel size.
            bound = 1.0 / math.sqrt(math.prod(spec.shape[1:]))
            values.uniform_(-bound, bound, generator=generator)
        return values.to(device=spec.device, dtype=spec.dtype)

    def merge(self, tree: Mapping[str, Any]) -> Tree:
        adapter_keys = self.adapter_keys(tree)
        self._require(tree, adapter_keys, "merge")
        merged = {k: v for k, v in tree.items() if k not in adapter_keys}
        if is_spec(tree):
            return merged
        for module in self.targets(tree):
            weight_key = _weight_key(module)
            lora_a, lora_b = self._adapter_pair(tree, module, tree[weight_key])
            merged[weight_key] = self._merged(module, tree[weight_key], lora_a, lora_b)
            if self.config.params.lora_bias:
                bias_key = _leaf_key(module, "bias")
                lora_bias = self._lora_bias(tree, module, tree[weight_key])
                bias_dtype = tree[bias_key].dtype if bias_key in tree else tree[weight_key].dtype
                merged[bias_key] = merge_bias(tree.get(bias_key), lora_bias, self.config.scale_of(module), bias_dtype)
        return merged

    def unmerge(self, merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> Tree:
        adapter_keys = self.adapter_keys(merged)
        extra = sorted(set(adapter) - adapter_keys)
        if extra:
            raise ValueError(
                f"The adapter contains key(s) {', '.join(extra[:5])} that this LoRA config does not target; "
                "pass the adapter leaves of this method only."
            )
        self._require(adapter, adapter_keys, "unmerge")
        clash = sorted(adapter_keys & merged.keys())
        if clash:
            raise ValueError(f"The merged tree already contains adapter key(s) {', '.join(clash[:5])}; pass the output of merge.")

        restored: Tree = dict(merged)
        if not is_spec(merged):
            for module in self.targets(merged):
                weight_key = _weight_key(module)
                lora_a, lora_b = self._adapter_pair(adapter, module, merged[weight_key])
                restored[weight_key] = self._merged(module, merged[weight_key], lora_a, lora_b, sign=-1)
                if self.config.params.lora_bias:
                    bias_key = _leaf_key(module, "bias")
                    self._require(merged, {bias_key}, "unmerge")
                    lora_bias = self._lora_bias(adapter, module, merged[weight_key])
                    # NOTE: a bias that merge created stays, holding zeros (up to rounding).
                    restored[bias_key] = merge_bias(
                        merged[bias_key], lora_bias, self.config.scale_of(module), merged[bias_key].dtype, sign=-1
                    )
        for key in sorted(adapter_keys):
            restored[key] = adapter[key]
        return restored

    def merge_map(self) -> StateMap:
        return LoRAMergeMap(self.config, unmerge=False)

    def bind_forward(self, spec: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, list[WeightAdapter]]]:
        targets = self.targets(spec)
        scales = {module: self.config.scale_of(module) for module in targets}
        dropout, transposed = self.config.params.dropout, self.config.params.fan_in_fan_out

        with_bias = self.config.params.lora_bias
        has_base_bias = {module: _leaf_key(module, "bias") in spec for module in targets}

        def bind(tree: Mapping[str, Any]) -> dict[str, list[WeightAdapter]]:
            adapters: dict[str, list[WeightAdapter]] = {}
            for module in targets:
                weight_key = _weight_key(module)
                lora_a, lora_b = self._adapter_pair(tree, module, tree[weight_key])
                lora_bias = self._lora_bias(tree, module, tree[weight_key]) if with_bias else None
                if lora_bias is not None and has_base_bias[module]:
                    # The module's own bias leaf carries the LoRA bias wherever it is used.
                    adapters[_leaf_key(module, "bias")] = [_LoRABias(module, lora_bias, scales[module])]
                    lora_bias = None
                adapters[weight_key] = [_LoRAWeight(module, lora_a, lora_b, scales[module], dropout, transposed, lora_bias)]
            return adapters

        return bind

    def _adapter_pair(self, tree: Mapping[str, Any], module: str, weight: Any) -> tuple[torch.Tensor, torch.Tensor]:
        key_a, key_b = _leaf_key(module, "lora_A"), _leaf_key(module, "lora_B")
        self._require(tree, {key_a, key_b}, "use")
        lora_a, lora_b = tree[key_a], tree[key_b]
        rank = self.config.rank_of(module)
        shape_a, shape_b = self._adapter_shapes(weight, rank)
        if tuple(lora_a.shape) != shape_a or tuple(lora_b.shape) != shape_b:
            raise ValueError(
                f"LoRA leaves of {module!r} have shapes {tuple(lora_a.shape)} (lora_A) and {tuple(lora_b.shape)} "
                f"(lora_B), but a weight of shape {tuple(weight.shape)} with r={rank} needs "
                f"{shape_a} and {shape_b}. Check that the adapter was made for this base model and this config's rank."
            )
        return lora_a, lora_b

    def _lora_bias(self, tree: Mapping[str, Any], module: str, weight: Any) -> torch.Tensor:
        key = _leaf_key(module, "lora_bias")
        self._require(tree, {key}, "use")
        out_features = self._features(weight)[0]
        if tuple(tree[key].shape) != (out_features,):
            raise ValueError(f"LoRA bias {key!r} has shape {tuple(tree[key].shape)}, but the module's output size needs ({out_features},).")
        return tree[key]

    def _merged(self, module: str, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, *, sign: int = 1) -> torch.Tensor:
        return merge_weight(
            weight, lora_a, lora_b, self.config.scale_of(module), transposed=self.config.params.fan_in_fan_out, sign=sign
        )

    @staticmethod
    def _require(tree: Mapping[str, Any], keys: set[str], action: str) -> None:
        missing = sorted(keys - tree.keys())
        if missing:
            raise KeyError(
                f"Cannot {action} LoRA: the tree has no {', '.join(repr(k) for k in missing[:4])}"
                f"{' and more' if len(missing) > 4 else ''}. Pass the tree returned by inject (or its adapter leaves)."
            )


@dataclasses.dataclass(frozen=True)
class LoRAMergeMap(StateMap):
    """LoRA's merge as a map: ``(W, A, B) -> (W + s B A, A, B)``, every other key unchanged.

    With ``unmerge=True`` it is the inverse shear ``(W', A, B) -> (W' - s B A, A, B)``.
    Not exact: the sum is rounded to the base dtype.
    """

    config: LoRAConfig
    unmerge: bool = False
    exact = False

    def reads(self, spec):
        return set(spec)

    def _plan(self, spec):
        method = LoRA(self.config)
        groups: list[Group] = []
        done: set[str] = set()
        for module in method.targets(spec):
            keys = (_weight_key(module), _leaf_key(module, "lora_A"), _leaf_key(module, "lora_B"))
            LoRA._require(spec, set(keys), "unmerge" if self.unmerge else "merge")
            method._adapter_pair(spec, module, spec[keys[0]])
            inputs, outputs = keys, keys
            if self.config.params.lora_bias:
                lora_bias_key, bias_key = _leaf_key(module, "lora_bias"), _leaf_key(module, "bias")
                LoRA._require(spec, {lora_bias_key}, "unmerge" if self.unmerge else "merge")
                # A base without a bias gets one from the merge.
                inputs = keys + (lora_bias_key,) + ((bias_key,) if bias_key in spec else ())
                outputs = keys + (lora_bias_key, bias_key)
            groups.append(Group(inputs, outputs, self._shear(keys, method, module)))
            done.update(inputs)
        groups.extend(Group((key,), (key,), dict) for key in spec if key not in done)
        return groups

    def _shear(self, keys: tuple[str, str, str], method: LoRA, module: str):
        weight_key, key_a, key_b = keys
        sign = -1 if self.unmerge else 1
        scale = self.config.scale_of(module)
        with_bias = self.config.params.lora_bias

        def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            weight = tensors[weight_key]
            result = dict(tensors)
            result[weight_key] = method._merged(module, weight, tensors[key_a], tensors[key_b], sign=sign)
            if with_bias:
                bias_key, lora_bias_key = _leaf_key(module, "bias"), _leaf_key(module, "lora_bias")
                bias = tensors.get(bias_key)
                dtype = bias.dtype if bias is not None else weight.dtype
                result[bias_key] = merge_bias(bias, tensors[lora_bias_key], scale, dtype, sign=sign)
            return result

        return fn

    def inverse(self) -> StateMap:
        return LoRAMergeMap(self.config, unmerge=not self.unmerge)

"""LoRA: ``W' = W + s * B @ A`` on the linear, convolution, embedding and expert weights of matched modules, with DoRA."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .._warnings import FtpeftWarning
from ..maps import Group, StateMap
from ..tree import TensorSpec, Tree, is_spec, module_path, module_paths
from ._lora_forward import _LoRABias, _LoRAWeight
from ._lora_layout import (
    LoRATarget,
    _magnitude_like,
    _weight_key,
    adapter_dtype,
    adapter_shapes,
    add_delta,
    dora_norm,
    dora_weight,
    lora_delta,
    magnitude_shape,
    merge_bias,
    merge_weight,
    target_delta,
    target_features,
)
from ._patterns import match_modules
from .base import PeftMethod, WeightAdapter
from .config import LoRAConfig

__all__ = ["LoRA", "LoRAMergeMap", "LoRATarget", "adapter_shapes", "add_delta", "lora_delta", "merge_bias", "merge_weight", "target_delta"]


def _parameter_hint(pattern: Any, tree: Mapping[str, Any]) -> str:
    """Return a hint for a module pattern that names modules owning 3-D parameters but no ``weight``, else ''."""
    stacks = [key for key in tree if TensorSpec.of(tree[key]).ndim == 3 and _weight_key(module_path(key)) not in tree]
    if not stacks:
        return ""
    modules = sorted({module_path(key) for key in stacks})
    if not match_modules(pattern, modules, method="LoRA", quiet=True):
        return ""
    return (
        f" The pattern names module(s) whose parameters are expert stacks, such as {stacks[0]!r}; "
        "target those with parameter_pattern, for example parameter_pattern=['experts.gate_up_proj']."
    )


def _per_expert_hint(tree: Mapping[str, Any]) -> str:
    """Return a hint when the tree stores experts one by one (``experts.0.w1.weight``), else ''."""
    per_expert = next((key for key in tree if re.search(r"\.experts\.\d+\.", key)), None)
    if per_expert is None:
        return ""
    return (
        f" The tree stores experts one by one (for example {per_expert!r}), as some checkpoints do, so it has no "
        "3-D expert stack to target. Load it through a map that stacks the experts (ftpeft.maps.Stack), or target "
        "the per-expert modules with module_name_pattern."
    )


def _warn_untied(tree: Mapping[str, Any], changed: list[str]) -> None:
    """Warn when a merged weight shared its storage with a key the merge left alone (tied weights)."""
    storages: dict[tuple, list[str]] = {}
    for key, value in tree.items():
        if type(value) is not torch.Tensor or value.device.type == "meta":
            continue
        try:
            pointer = value.data_ptr()
        except RuntimeError:  # a tensor without storage, such as a functorch wrapper
            continue
        storages.setdefault((value.device, pointer, tuple(value.shape)), []).append(key)
    changed_set = set(changed)
    for keys in storages.values():
        unchanged = [key for key in keys if key not in changed_set]
        for key in keys:
            if key in changed_set and unchanged:
                warnings.warn(
                    f"The merge changes {key!r}, which shares its storage with {unchanged[0]!r} (tied weights), so the two now "
                    "differ. Load the merged tree into a model whose weights are not tied (for transformers, "
                    "tie_word_embeddings=False); loaded into a tied model, one of the two values is lost.",
                    FtpeftWarning,
                    stacklevel=3,
                )


class LoRA(PeftMethod):
    """LoRA on the weights of matched modules and parameters: linear, convolution, embedding and expert weights.

    For a linear weight ``W`` of shape ``(out, in)``, ``inject`` adds
    ``<module>.lora_A`` of shape ``(r, in)`` and ``<module>.lora_B`` of shape
    ``(out, r)``. The adapted weight is ``W + s * B @ A`` with
    ``s = alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA. A starts
    kaiming-uniform (or gaussian) and B at zero, so a fresh adapter changes
    nothing. Adapter leaves are float32 when the base weight is float16 or
    bfloat16, and take the base weight's dtype otherwise. With
    ``fan_in_fan_out`` the weight is stored as ``(in, out)`` and the update
    added to it is transposed. ``rank_pattern`` and ``alpha_pattern`` set r
    and alpha per module. With ``lora_bias``, ``<module>.lora_bias`` of shape
    ``(out,)`` adds ``s * lora_bias`` to the module's output. Embedding
    tables (``embedding_pattern``), convolution kernels and expert stacks
    (``parameter_pattern``) have their own layouts, given by ``adapter_shapes``.
    With ``use_dora``, ``<target>.lora_magnitude_vector`` rescales each
    output row of the adapted weight.
    """

    def __init__(self, config: LoRAConfig):
        self.config = config

    def targets(self, tree: Mapping[str, Any]) -> list[str]:
        """Return the names of the targets in ``tree``: module paths, then the keys of targeted parameters.

        Raises:
            ValueError: as ``lora_targets`` does.
        """
        return [target.name for target in self.lora_targets(tree)]

    def lora_targets(self, tree: Mapping[str, Any]) -> list[LoRATarget]:
        """Return every weight this method adapts in ``tree``, with its layout.

        Module patterns are matched against the paths of modules that own a
        ``weight`` leaf; ``parameter_pattern`` against every key.

        Raises:
            ValueError: if a pattern matches nothing, a matched weight has a
                shape or dtype LoRA cannot adapt, or an option does not fit a
                target's kind. The message names the pattern or the target.
        """
        config, params = self.config, self.config.params
        targets: list[LoRATarget] = []
        if config.module_name_pattern is not None:
            candidates = [m for m in module_paths(tree) if _weight_key(m) in tree]
            try:
                matched = match_modules(config.module_name_pattern, candidates, method="LoRA")
            except ValueError as error:
                raise ValueError(f"{error}{_parameter_hint(config.module_name_pattern, tree)}") from None
            embeddings = set()
            if config.embedding_pattern is not None:
                embeddings = set(match_modules(config.embedding_pattern, matched, method="LoRA embedding_pattern"))
            for module in matched:
                weight = TensorSpec.of(tree[_weight_key(module)])
                if module in embeddings:
                    kind = "embedding"
                else:
                    kind = "linear" if weight.ndim == 2 else "conv"
                targets.append(LoRATarget(module, _weight_key(module), kind, params.fan_in_fan_out and kind == "linear", module))
        if config.parameter_pattern is not None:
            # Stacks of experts first, so that a no-match message lists them.
            keys = sorted(tree, key=lambda key: TensorSpec.of(tree[key]).ndim != 3)
            try:
                matched = match_modules(config.parameter_pattern, keys, method="LoRA parameter_pattern", noun="parameter")
            except ValueError as error:
                raise ValueError(f"{error}{_per_expert_hint(tree)}") from None
            matched = [key for key in tree if key in set(matched)]
            module_weight_keys = {target.weight_key for target in targets}
            for key in matched:
                if key in module_weight_keys:
                    raise ValueError(
                        f"LoRA targets {key!r} twice: through module_name_pattern and through parameter_pattern. "
                        "Leave it out of one of them."
                    )
                weight = TensorSpec.of(tree[key])
                kind = "experts" if weight.ndim == 3 else "linear"
                experts = weight.shape[0] if kind == "experts" else 0
                targets.append(LoRATarget(key, key, kind, config.parameters_transposed, module_path(key), experts))

        names = [target.name for target in targets]
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(config, field):
                if not match_modules([key], names, method=f"LoRA {field}", quiet=True):
                    raise ValueError(
                        f"LoRA {field} key {key!r} matches none of the targets "
                        f"({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}); fix or remove it."
                    )
        for target in targets:
            self._check_target(target, TensorSpec.of(tree[target.weight_key]))
        return targets

    def _check_target(self, target: LoRATarget, weight: TensorSpec) -> None:
        params = self.config.params
        expected = {"linear": (2,), "conv": (3, 4, 5), "embedding": (2,), "experts": (3,)}[target.kind]
        if weight.ndim not in expected or not weight.dtype.is_floating_point:
            if target.kind == "experts" or target.name == target.weight_key:
                fix = "parameter_pattern targets 2-D weights and 3-D expert stacks (E, out, in); narrow it"
            elif target.kind == "embedding":
                fix = "an embedding table is 2-D (num_embeddings, embedding_dim); narrow embedding_pattern"
            else:
                fix = "narrow module_name_pattern so that it leaves this module out"
            raise ValueError(
                f"LoRA cannot adapt {target.name!r}: its weight has shape {weight.shape} and dtype {weight.dtype}. "
                "LoRA needs a floating-point weight that is 2-D (used by F.linear or F.embedding), a 3-D to 5-D "
                f"convolution kernel, or a 3-D expert stack given by parameter_pattern. Fix: {fix}."
            )
        if target.kind == "conv" and params.fan_in_fan_out:
            raise ValueError(
                f"LoRA target {target.name!r} is a convolution kernel {weight.shape}, which fan_in_fan_out=True cannot "
                "describe. Put the convolutions in a separate LoRAConfig without fan_in_fan_out."
            )
        unsupported = {
            "embedding": {"lora_bias": params.lora_bias, "fan_in_fan_out": params.fan_in_fan_out},
            "experts": {"dropout > 0": params.dropout > 0, "lora_bias": params.lora_bias, "use_dora": params.use_dora},
        }.get(target.kind, {})
        if params.init in ("pissa", "olora") and target.kind in ("embedding", "experts"):
            unsupported[f"init={params.init!r}"] = True
        chosen = [name for name, value in unsupported.items() if value]
        if chosen:
            raise ValueError(
                f"LoRA target {target.name!r} has the {target.kind} layout, which "
                f"does not support {', '.join(chosen)}. Put it in a separate LoRAConfig without these options "
                "(a PeftStackConfig holds both)."
            )

    def check_model(self, model: torch.nn.Module) -> None:
        from ..tree import spec_of

        fan_in_fan_out = self.config.params.fan_in_fan_out
        for target in self.lora_targets(spec_of(model)):
            layer = model.get_submodule(target.module)
            if target.kind == "experts":
                # transformers marks expert modules that store (E, in, out) with is_transposed.
                stored_transposed = bool(getattr(layer, "is_transposed", False))
                if stored_transposed != target.transposed:
                    layouts = "(E, in, out)" if stored_transposed else "(E, out, in)"
                    raise ValueError(
                        f"LoRA target {target.name!r} stores its experts as {layouts}, but the config has "
                        f"parameters_transposed={target.transposed}. Set LoRAConfig(parameters_transposed={stored_transposed})."
                    )
                continue
            if target.name != target.module:
                continue
            is_embedding = isinstance(layer, torch.nn.Embedding)
            if is_embedding and target.kind != "embedding":
                raise ValueError(
                    f"LoRA target {target.module!r} is an nn.Embedding, so it needs the embedding layout. Add it to "
                    f"embedding_pattern, for example embedding_pattern=[{target.module.rpartition('.')[2]!r}]."
                )
            if target.kind == "embedding" and not is_embedding:
                raise ValueError(
                    f"embedding_pattern matches {target.module!r}, which is a {type(layer).__name__}, not an "
                    "nn.Embedding. Narrow embedding_pattern to the embedding tables."
                )
            # transformers' Conv1D stores its weight (in, out); it is recognised by name to avoid importing transformers.
            is_conv1d = type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")
            if is_conv1d and not fan_in_fan_out:
                raise ValueError(
                    f"LoRA target {target.module!r} is a Conv1D, whose weight is stored as (in, out), but the config has "
                    "fan_in_fan_out=False. Set LoRAParameters(fan_in_fan_out=True) for these modules."
                )
            if isinstance(layer, torch.nn.Linear) and fan_in_fan_out:
                raise ValueError(
                    f"LoRA target {target.module!r} is an nn.Linear, whose weight is stored as (out, in), but the config has "
                    "fan_in_fan_out=True. Set LoRAParameters(fan_in_fan_out=False) for these modules."
                )

    def _leaf_keys(self, target: LoRATarget) -> list[str]:
        keys = [target.key_a, target.key_b]
        if self.config.params.lora_bias:
            keys.append(target.key_lora_bias)
        if self.config.params.use_dora:
            keys.append(target.key_magnitude)
        return keys

    def adapter_keys(self, tree: Mapping[str, Any]) -> set[str]:
        return {key for target in self.lora_targets(tree) for key in self._leaf_keys(target)}

    def trainable_keys(self, tree: Mapping[str, Any]) -> set[str]:
        keys = self.adapter_keys(tree)
        self._require(tree, keys, "train")
        return keys

    def inject(self, params: Mapping[str, Any], *, generator: torch.Generator | None = None) -> Tree:
        planning = is_spec(params)
        targets = self.lora_targets(params)
        already = sorted(k for k in self.adapter_keys(params) if k in params)
        if already:
            raise ValueError(
                f"The tree already contains LoRA leaves ({', '.join(already[:3])}, ...). inject takes the base "
                "tree; to stack two LoRAs on one module use separate trees, or merge the first one before injecting."
            )

        adapted: Tree = dict(params)
        magnitudes: list[tuple[LoRATarget, TensorSpec]] = []
        for target in targets:
            weight = TensorSpec.of(params[target.weight_key])
            rank = self.config.rank_of(target.name)
            dtype = adapter_dtype(weight.dtype)
            shape_a, shape_b = adapter_shapes(target, weight.shape, rank)
            spec_a = TensorSpec(shape_a, dtype, weight.device, adapter=True)
            spec_b = TensorSpec(shape_b, dtype, weight.device, adapter=True)
            if planning:
                adapted[target.key_a] = spec_a
                adapted[target.key_b] = spec_b
            elif self.config.params.init in ("pissa", "olora") and weight.device.type != "meta":
                if weight.ndim != 2:
                    raise ValueError(
                        f"LoRA init {self.config.params.init!r} needs a 2-D weight, but {target.name!r} has shape "
                        f"{weight.shape}; use init='kaiming_uniform' or 'gaussian' for convolutions."
                    )
                residual, lora_a, lora_b = self._decompose(target, params[target.weight_key], rank, dtype)
                adapted[target.weight_key] = residual
                adapted[target.key_a] = lora_a
                adapted[target.key_b] = lora_b
            elif target.kind == "embedding":
                adapted[target.key_a], adapted[target.key_b] = self._init_embedding(spec_a, spec_b, rank, generator)
            else:
                adapted[target.key_a] = self._init_a(spec_a, rank, generator)
                adapted[target.key_b] = torch.zeros(spec_b.shape, dtype=dtype, device=weight.device)
            if self.config.params.lora_bias:
                out_features = target_features(target, weight.shape)[0]
                spec_bias = TensorSpec((out_features,), dtype, weight.device, adapter=True)
                adapted[target.key_lora_bias] = (
                    spec_bias if planning else torch.zeros(spec_bias.shape, dtype=dtype, device=weight.device)
                )
            if self.config.params.use_dora:
                magnitudes.append((target, TensorSpec(magnitude_shape(target, weight.shape), dtype, weight.device, adapter=True)))
        distributed = not planning and "torch.distributed.tensor" in sys.modules
        if distributed:
            # Only then can the tree hold DTensors; their adapters become DTensors placed to match.
            from ..distributed import distribute_adapters

            adapted = distribute_adapters(self, adapted)
        # DoRA's magnitude is a norm of W + s B A, so it is computed once A and B sit beside a DTensor weight.
        for target, spec_magnitude in magnitudes:
            adapted[target.key_magnitude] = spec_magnitude if planning else self._init_magnitude(target, adapted, spec_magnitude)
        if distributed and magnitudes:
            adapted = distribute_adapters(self, adapted)
        return adapted

    def _init_magnitude(self, target: LoRATarget, adapted: Mapping[str, Any], spec: TensorSpec) -> torch.Tensor:
        """Return the row norms of the adapted weight, DoRA's starting magnitude."""
        weight = adapted[target.weight_key]
        if weight.device.type == "meta":
            return torch.empty(spec.shape, dtype=spec.dtype, device="meta")
        with torch.no_grad():
            return self._norm_of(target, adapted).to(spec.dtype)

    def _init_embedding(
        self, spec_a: TensorSpec, spec_b: TensorSpec, rank: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return embedding leaves: A = 0 and B standard normal, or with ``gaussian`` A normal with standard deviation 1/r and B = 0."""
        if spec_a.device.type == "meta":
            return torch.empty(spec_a.shape, dtype=spec_a.dtype, device="meta"), torch.empty(spec_b.shape, dtype=spec_b.dtype, device="meta")
        draw_device = generator.device if generator is not None else spec_a.device
        if self.config.params.init == "gaussian":
            lora_a = torch.empty(spec_a.shape, dtype=torch.float32, device=draw_device).normal_(0.0, 1.0 / rank, generator=generator)
            lora_b = torch.zeros(spec_b.shape, dtype=torch.float32)
        else:
            lora_a = torch.zeros(spec_a.shape, dtype=torch.float32)
            lora_b = torch.empty(spec_b.shape, dtype=torch.float32, device=draw_device).normal_(0.0, 1.0, generator=generator)
        return lora_a.to(device=spec_a.device, dtype=spec_a.dtype), lora_b.to(device=spec_b.device, dtype=spec_b.dtype)

    def _decompose(
        self, target: LoRATarget, weight: torch.Tensor, rank: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(W - s * B @ A, A, B)`` for the PiSSA or OLoRA initialisation of one weight."""
        module = target.name
        scale = self.config.scale_of(module)
        transposed = target.transposed
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

    def residual_weight(self, target: LoRATarget, weight: torch.Tensor) -> torch.Tensor:
        """Return the base weight that a PiSSA or OLoRA ``inject`` leaves, ``W - s * B0 @ A0``, for one target.

        ``target`` is one of ``lora_targets(tree)``. Use it to rebuild the base
        of an adapter trained with these inits from the original weight, as
        ``inject`` would: the SVD and QR decompositions are deterministic.

        Raises:
            ValueError: if the config's init is neither ``pissa`` nor ``olora``.
        """
        if self.config.params.init not in ("pissa", "olora"):
            raise ValueError(f"residual_weight is for init 'pissa' or 'olora'; this config has init {self.config.params.init!r}.")
        rank = self.config.rank_of(target.name)
        return self._decompose(target, weight, rank, adapter_dtype(weight.dtype))[0]

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
        targets = self.lora_targets(tree)
        for target in targets:
            merged.update(self._merge_target(target, tree, sign=1))
        _warn_untied(tree, [target.weight_key for target in targets])
        return merged

    def _merge_target(self, target: LoRATarget, tree: Mapping[str, Any], *, sign: int) -> Tree:
        """Return the merged (``sign=1``) or unmerged (``sign=-1``) weight of one target, and its bias when LoRA changes it.

        Unmerging DoRA reads the norm leaf that ``weight_norms`` returned before the merge.
        """
        weight = tree[target.weight_key]
        lora_a, lora_b = self._adapter_pair(tree, target, weight)
        scale = self.config.scale_of(target.name)
        result: Tree = {}
        if self.config.params.use_dora:
            magnitude = self._magnitude(tree, target, weight)
            delta = target_delta(target, lora_a, lora_b, scale, weight.dtype)
            if sign > 0:
                result[target.weight_key] = dora_weight(target, weight, delta, magnitude)
            else:
                magnitude = _magnitude_like(target, magnitude, weight.dim()).to(delta.dtype)
                norms = self._norm_leaf(tree, target, weight).to(delta.dtype)
                result[target.weight_key] = (weight.to(delta.dtype) * (norms / magnitude) - delta).to(weight.dtype)
        elif target.kind in ("linear", "conv"):
            result[target.weight_key] = merge_weight(weight, lora_a, lora_b, scale, transposed=target.transposed, sign=sign)
        else:
            result[target.weight_key] = add_delta(weight, target_delta(target, lora_a, lora_b, scale, weight.dtype), sign=sign)
        if self.config.params.lora_bias:
            bias = tree.get(target.bias_key)
            if sign < 0:
                self._require(tree, {target.bias_key}, "unmerge")
            lora_bias = self._lora_bias(tree, target, weight)
            dtype = bias.dtype if bias is not None else weight.dtype
            # NOTE: unmerging keeps a bias that the merge created, holding zeros up to rounding.
            result[target.bias_key] = merge_bias(bias, lora_bias, scale, dtype, sign=sign)
        return result

    def weight_norms(self, tree: Mapping[str, Any]) -> Tree:
        """Return DoRA's norm leaves ``<target>.lora_weight_norm``: ``||W + s B A||`` per output row of an adapted tree.

        A DoRA merge divides every row by this norm, and the merged weight no
        longer records it (each merged row has norm m). Keep these leaves
        before merging and pass them to ``unmerge`` with the adapter.

        Raises:
            ValueError: if the config does not use DoRA.
        """
        if not self.config.params.use_dora:
            raise ValueError("weight_norms is for DoRA adapters; this LoRA config has use_dora=False.")
        self._require(tree, self.adapter_keys(tree), "compute the DoRA norms of")
        norms: Tree = {}
        for target in self.lora_targets(tree):
            norms[target.key_norm] = self._norm_of(target, tree)
        return norms

    def _norm_of(self, target: LoRATarget, tree: Mapping[str, Any]) -> torch.Tensor:
        weight = tree[target.weight_key]
        lora_a, lora_b = self._adapter_pair(tree, target, weight)
        delta = target_delta(target, lora_a.detach(), lora_b.detach(), self.config.scale_of(target.name), weight.dtype)
        norm = dora_norm(target, weight.detach().to(delta.dtype) + delta)
        return norm.reshape(magnitude_shape(target, weight.shape))

    def unmerge(self, merged: Mapping[str, Any], adapter: Mapping[str, Any]) -> Tree:
        targets = self.lora_targets(merged)
        adapter_keys = self.adapter_keys(merged)
        norm_keys = {target.key_norm for target in targets} if self.config.params.use_dora else set()
        extra = sorted(set(adapter) - adapter_keys - norm_keys)
        if extra:
            raise ValueError(
                f"The adapter contains key(s) {', '.join(extra[:5])} that this LoRA config does not target; "
                "pass the adapter leaves of this method only."
            )
        self._require(adapter, adapter_keys, "unmerge")
        if norm_keys - set(adapter):
            missing = sorted(norm_keys - set(adapter))
            raise ValueError(
                f"Unmerging DoRA needs the weight norms from before the merge, and the adapter has no "
                f"{', '.join(repr(k) for k in missing[:3])}. Keep method.weight_norms(tree) before merging and pass "
                "those leaves with the adapter."
            )
        clash = sorted(adapter_keys & merged.keys())
        if clash:
            raise ValueError(f"The merged tree already contains adapter key(s) {', '.join(clash[:5])}; pass the output of merge.")

        restored: Tree = dict(merged)
        if not is_spec(merged):
            combined = {**merged, **adapter}
            for target in targets:
                restored.update(self._merge_target(target, combined, sign=-1))
        for key in sorted(adapter_keys):
            restored[key] = adapter[key]
        return restored

    def merge_map(self) -> StateMap:
        return LoRAMergeMap(self.config, unmerge=False)

    def bind_forward(self, spec: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict[str, list[WeightAdapter]]]:
        targets = self.lora_targets(spec)
        scales = {target.name: self.config.scale_of(target.name) for target in targets}
        dropout = self.config.params.dropout
        with_bias, with_dora = self.config.params.lora_bias, self.config.params.use_dora
        has_base_bias = {target.name: target.bias_key in spec for target in targets}

        def bind(tree: Mapping[str, Any]) -> dict[str, list[WeightAdapter]]:
            adapters: dict[str, list[WeightAdapter]] = {}
            for target in targets:
                weight = tree[target.weight_key]
                lora_a, lora_b = self._adapter_pair(tree, target, weight)
                lora_bias = self._lora_bias(tree, target, weight) if with_bias else None
                magnitude = self._magnitude(tree, target, weight) if with_dora else None
                if lora_bias is not None and has_base_bias[target.name]:
                    # The module's own bias leaf carries the LoRA bias wherever it is used.
                    adapters[target.bias_key] = [_LoRABias(target.module, lora_bias, scales[target.name])]
                    lora_bias = None
                adapters[target.weight_key] = [
                    _LoRAWeight(target, lora_a, lora_b, scales[target.name], dropout, lora_bias, magnitude, weight if with_dora else None)
                ]
            return adapters

        return bind

    def _adapter_pair(self, tree: Mapping[str, Any], target: LoRATarget, weight: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._require(tree, {target.key_a, target.key_b}, "use")
        lora_a, lora_b = tree[target.key_a], tree[target.key_b]
        rank = self.config.rank_of(target.name)
        shape_a, shape_b = adapter_shapes(target, tuple(weight.shape), rank)
        if tuple(lora_a.shape) != shape_a or tuple(lora_b.shape) != shape_b:
            name_a, name_b = target.key_a.rpartition(".")[2], target.key_b.rpartition(".")[2]
            raise ValueError(
                f"LoRA leaves of {target.name!r} have shapes {tuple(lora_a.shape)} ({name_a}) and {tuple(lora_b.shape)} "
                f"({name_b}), but a weight of shape {tuple(weight.shape)} with r={rank} needs "
                f"{shape_a} and {shape_b}. Check that the adapter was made for this base model and this config's rank."
            )
        return lora_a, lora_b

    def _lora_bias(self, tree: Mapping[str, Any], target: LoRATarget, weight: Any) -> torch.Tensor:
        key = target.key_lora_bias
        self._require(tree, {key}, "use")
        out_features = target_features(target, tuple(weight.shape))[0]
        if tuple(tree[key].shape) != (out_features,):
            raise ValueError(f"LoRA bias {key!r} has shape {tuple(tree[key].shape)}, but the module's output size needs ({out_features},).")
        return tree[key]

    def _magnitude(self, tree: Mapping[str, Any], target: LoRATarget, weight: Any) -> torch.Tensor:
        key = target.key_magnitude
        self._require(tree, {key}, "use")
        expected = magnitude_shape(target, tuple(weight.shape))
        if tuple(tree[key].shape) != expected:
            raise ValueError(f"DoRA magnitude {key!r} has shape {tuple(tree[key].shape)}, but a weight of shape {tuple(weight.shape)} needs {expected}.")
        return tree[key]

    def _norm_leaf(self, tree: Mapping[str, Any], target: LoRATarget, weight: Any) -> torch.Tensor:
        key = target.key_norm
        expected = magnitude_shape(target, tuple(weight.shape))
        if tuple(tree[key].shape) != expected:
            raise ValueError(f"DoRA norm {key!r} has shape {tuple(tree[key].shape)}, but a weight of shape {tuple(weight.shape)} needs {expected}.")
        return _magnitude_like(target, tree[key], weight.dim())

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
    With DoRA the merge also outputs the norm leaf ``<target>.lora_weight_norm``
    and the unmerge reads it back. Not exact: the sum is rounded to the base dtype.
    """

    config: LoRAConfig
    unmerge: bool = False
    exact = False

    def reads(self, spec):
        return set(spec)

    def _plan(self, spec):
        method = LoRA(self.config)
        params = self.config.params
        action = "unmerge" if self.unmerge else "merge"
        groups: list[Group] = []
        done: set[str] = set()
        for target in method.lora_targets(spec):
            keys = (target.weight_key, *method._leaf_keys(target))
            LoRA._require(spec, set(keys), action)
            method._adapter_pair(spec, target, spec[target.weight_key])
            inputs, outputs = keys, keys
            if params.use_dora:
                if self.unmerge:
                    LoRA._require(spec, {target.key_norm}, action)
                    inputs = keys + (target.key_norm,)
                else:
                    outputs = keys + (target.key_norm,)
            if params.lora_bias:
                # A base without a bias gets one from the merge.
                inputs = inputs + ((target.bias_key,) if target.bias_key in spec else ())
                outputs = outputs + (target.bias_key,)
            groups.append(Group(inputs, outputs, self._shear(method, target)))
            done.update(inputs)
        groups.extend(Group((key,), (key,), dict) for key in spec if key not in done)
        return groups

    def _shear(self, method: LoRA, target: LoRATarget):
        sign = -1 if self.unmerge else 1
        with_dora = self.config.params.use_dora

        def fn(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            result = dict(tensors)
            if with_dora and not self.unmerge:
                result[target.key_norm] = method._norm_of(target, tensors)
            result.update(method._merge_target(target, tensors, sign=sign))
            if with_dora and self.unmerge:
                del result[target.key_norm]
            return result

        return fn

    def inverse(self) -> StateMap:
        return LoRAMergeMap(self.config, unmerge=not self.unmerge)

"""Adapter arithmetic: pure functions over ``(LoRAConfig, adapter)`` pairs.

An *adapter* here is the dict of LoRA leaves only, ``<module>.lora_A`` of
shape ``(r, in)`` and ``<module>.lora_B`` of shape ``(out, r)``, as
``ftpeft.select(tree, method.adapter_keys(tree))`` returns it. Its config
gives each module's scale ``s = config.scale_of(module)``, so the module's
update is ``s * B @ A``, transposed when ``params.fan_in_fan_out`` is set.

Functions that return an adapter return a new ``(LoRAConfig, adapter)`` pair
and never change their inputs. Their output configs have scale 1 on every
module (``alpha = r``, no rsLoRA), so the new leaves alone carry each
source's scale, rsLoRA and per-module rank and alpha included. The output's
``module_name_pattern`` is an alternation of the adapted module paths, which
matches exactly those modules.

Merges that act elementwise (``ties_merge``, ``dare_merge``) return
dense deltas keyed by weight key, because their result is in general of full
rank. ``deltas_to_lora`` turns dense deltas back into a low-rank adapter
at a rank the caller chooses, and ``add_deltas`` adds them to a base tree.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch

from .methods.config import LoRAConfig, LoRAParameters
from .methods.lora import adapter_dtype, add_delta, lora_delta
from .tree import Tree

__all__ = [
    "LoRASource",
    "add_deltas",
    "dare_merge",
    "deltas_to_lora",
    "dense_deltas",
    "negate",
    "scale_adapter",
    "svd_compress",
    "ties_merge",
    "weighted_sum",
]

#: One adapter with the config it was made with.
LoRASource = tuple[LoRAConfig, Mapping[str, torch.Tensor]]

_LEAF_NAMES = ("lora_A", "lora_B")


def weighted_sum(sources: Sequence[LoRASource], weights: Sequence[float]) -> tuple[LoRAConfig, Tree]:
    """Combine adapters exactly into one adapter by concatenating their ranks.

    For every module that at least one source adapts, the result's update is

        delta = sum_i w_i * s_i * B_i @ A_i

    where the sum runs over the sources that adapt the module and ``s_i`` is
    source ``i``'s scale for that module. The result stacks the factors:
    ``A = [A_1; A_2; ...]`` along the rank (rows) and
    ``B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]`` along the rank (columns), so
    ``B @ A`` equals the sum above. Each factor ``w_i * s_i`` goes into the
    B block and the A blocks are copied unchanged. The module's rank is the
    sum of the source ranks, and its scale is 1.

    Args:
        sources: ``(config, adapter)`` pairs. All configs must agree on
            ``fan_in_fan_out``. A module may be missing from some sources.
        weights: one weight per source; any real number, zero and negative
            included.

    Returns:
        A new ``(config, adapter)``. The config's ``alpha`` equals each
        module's rank (``rank_pattern`` and ``alpha_pattern`` list the
        modules whose rank differs from ``params.r``), ``use_rslora`` is
        False, and ``dropout`` and ``init``, which do not change the update,
        come from the first source. Each module's leaves take the promoted
        dtype of the sources' leaves.

    Raises:
        ValueError: if ``sources`` is empty, the number of weights differs
            from the number of sources, the sources differ in
            ``fan_in_fan_out``, or two sources give one module different
            ``in`` or ``out`` sizes. The message names the source and module.
    """
    if not sources:
        raise ValueError("weighted_sum needs at least one (config, adapter) source; got none.")
    if len(weights) != len(sources):
        raise ValueError(f"weighted_sum got {len(sources)} sources but {len(weights)} weights; give one weight per source.")
    pairs = [_lora_pairs(config, adapter, f"source {index}") for index, (config, adapter) in enumerate(sources)]
    fan_in_fan_out = _common_fan_in_fan_out(sources, pairs)

    blocks_a: dict[str, list[torch.Tensor]] = {}
    blocks_b: dict[str, list[torch.Tensor]] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for index, ((config, _), modules) in enumerate(zip(sources, pairs)):
        for module, (lora_a, lora_b) in modules.items():
            _check_same_sizes(shapes, module, index, lora_a, lora_b)
            factor = float(weights[index]) * config.scale_of(module)
            blocks_a.setdefault(module, []).append(lora_a)
            blocks_b.setdefault(module, []).append(lora_b * factor)

    adapter: Tree = {}
    ranks: dict[str, int] = {}
    for module in blocks_a:
        dtype = _promoted_dtype(blocks_a[module] + blocks_b[module])
        adapter[_leaf_key(module, "lora_A")] = torch.cat([block.to(dtype) for block in blocks_a[module]], dim=0)
        adapter[_leaf_key(module, "lora_B")] = torch.cat([block.to(dtype) for block in blocks_b[module]], dim=1)
        ranks[module] = adapter[_leaf_key(module, "lora_A")].shape[0]

    first = sources[0][0].params
    return _unit_scale_config(ranks, fan_in_fan_out=fan_in_fan_out, dropout=first.dropout, init=first.init), adapter


def scale_adapter(config: LoRAConfig, adapter: Mapping[str, torch.Tensor], factor: float) -> tuple[LoRAConfig, Tree]:
    """Multiply every module's update by ``factor``: ``delta = factor * s * B @ A``.

    The factor goes into B (``B' = factor * B``), so the config, and with it
    every module's scale, stays the same. The returned config is a copy of
    ``config``, and the A leaves are the caller's own tensors, as in every
    ftpeft transform that leaves a leaf unchanged.

    Raises:
        ValueError: if the adapter does not fit the config (see ``dense_deltas``).
    """
    modules = _lora_pairs(config, adapter, "the adapter")

    scaled: Tree = {}
    for module, (lora_a, lora_b) in modules.items():
        scaled[_leaf_key(module, "lora_A")] = lora_a
        scaled[_leaf_key(module, "lora_B")] = lora_b * float(factor)
    return config.model_copy(deep=True), scaled


def negate(config: LoRAConfig, adapter: Mapping[str, torch.Tensor]) -> tuple[LoRAConfig, Tree]:
    """Flip the sign of every module's update: ``delta = -s * B @ A``.

    Adding the negated adapter's update to a merged weight removes the
    original adapter's update. Same as ``scale_adapter(config, adapter, -1)``.
    """
    return scale_adapter(config, adapter, -1.0)


def svd_compress(config: LoRAConfig, adapter: Mapping[str, torch.Tensor], rank: int) -> tuple[LoRAConfig, Tree]:
    """Re-factor every module's update at a lower rank with a truncated SVD.

    For each module, with ``delta = s * B @ A = U diag(S) V^T`` (singular
    values in decreasing order), the result keeps the first
    ``k = min(rank, r, out, in)`` singular triplets:

        B' = U_k diag(sqrt(S_k)),   A' = diag(sqrt(S_k)) V_k^T,   scale 1

    so ``B' @ A' = U_k diag(S_k) V_k^T``, the best rank-``k`` approximation of
    ``delta`` in the Frobenius and spectral norms. When ``rank`` is at least
    the module's rank the update is reproduced up to float rounding. The
    dense ``(out, in)`` update is never built: the SVD runs on the
    ``r x r`` core of QR factorisations of B and A^T, in float64.

    Args:
        config: the adapter's config.
        adapter: the LoRA leaves.
        rank: the target rank, at least 1.

    Returns:
        A new ``(config, adapter)`` with scale 1 on every module and the
        source's ``fan_in_fan_out``, ``dropout`` and ``init``. The leaves keep
        the promoted dtype of each module's A and B.

    Raises:
        ValueError: if ``rank`` is not a positive integer, or the adapter
            does not fit the config.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"svd_compress needs a positive integer rank, got {rank!r}.")
    modules = _lora_pairs(config, adapter, "the adapter")

    compressed: Tree = {}
    ranks: dict[str, int] = {}
    for module, (lora_a, lora_b) in modules.items():
        dtype = _promoted_dtype([lora_a, lora_b])
        compute = lora_a.to(torch.float64), lora_b.to(torch.float64)

        # B = Q_b R_b and A^T = Q_a R_a, so s B A = Q_b (s R_b R_a^T) Q_a^T and
        # the SVD of the small core gives the SVD of the whole update.
        q_b, r_b = torch.linalg.qr(compute[1])
        q_a, r_a = torch.linalg.qr(compute[0].T)
        core = config.scale_of(module) * (r_b @ r_a.T)
        u, singular, vh = torch.linalg.svd(core, full_matrices=False)

        kept = min(rank, singular.shape[0])
        root = singular[:kept].sqrt()
        new_b = (q_b @ u[:, :kept]) * root
        new_a = root[:, None] * (vh[:kept] @ q_a.T)
        compressed[_leaf_key(module, "lora_A")] = new_a.to(dtype)
        compressed[_leaf_key(module, "lora_B")] = new_b.to(dtype)
        ranks[module] = kept

    params = config.params
    return _unit_scale_config(ranks, fan_in_fan_out=params.fan_in_fan_out, dropout=params.dropout, init=params.init), compressed


def dense_deltas(config: LoRAConfig, adapter: Mapping[str, torch.Tensor]) -> Tree:
    """Compute every module's dense update, keyed by the weight it changes.

    ``<module>.weight`` maps to ``s * B @ A`` of shape ``(out, in)``, or to
    its transpose with ``fan_in_fan_out``, so each delta has the shape of the
    stored weight and adds to it directly. Deltas are computed in float32, or
    in the adapter's dtype if that is wider, as ``merge``
    computes them.

    Raises:
        ValueError: if a key is not a LoRA leaf, a module lacks its A or B, or
            the leaves' shapes do not fit each other or the config's rank
            for the module.
    """
    modules = _lora_pairs(config, adapter, "the adapter")
    return _dense_deltas_of(config, modules)


def ties_merge(
    sources: Sequence[LoRASource], *, density: float, weights: Sequence[float] | None = None
) -> Tree:
    """Merge adapters with TIES-merging (trim, elect sign, disjoint mean) on their dense updates.

    For each weight key, let ``d_i = w_i * delta_i`` be the weighted dense
    update of source ``i`` (see ``dense_deltas``). A source that does not
    adapt the module takes no part. The merge has three steps:

    1. Trim: keep the entries of ``d_i`` whose magnitude is at least the
       ``ceil(density * n)``-th largest magnitude of ``d_i``, where ``n`` is
       its number of entries, and set the rest to zero, giving ``t_i``.
       Entries tied at that magnitude are all kept.
    2. Elect: ``sign = sign(sum_i t_i)``, elementwise.
    3. Disjoint mean: each entry is the mean of those ``t_i`` entries that are
       nonzero and have the elected sign, or zero if there are none.

    With every weight 1 this is the plain method. A common weight
    ``lambda`` for all sources scales the result by ``lambda``.

    The result is a dense delta per weight key, not a low-rank adapter,
    because trimming entries one by one destroys the low-rank structure.
    Add it to a base tree with ``add_deltas``, or re-factor it with
    ``deltas_to_lora`` at a rank of your choice.

    Args:
        sources: ``(config, adapter)`` pairs. Their ``fan_in_fan_out`` may
            differ, because each delta is in its weight's stored layout.
        density: the fraction of each delta's entries that the trim step
            keeps, in (0, 1]. It keeps at least ``ceil(density * n)``
            entries, more when magnitudes tie at the threshold.
        weights: one weight per source; all 1 when omitted.

    Returns:
        A new dict mapping each adapted weight key to its merged delta, in
        the promoted dtype of the sources' deltas.

    Raises:
        ValueError: if ``density`` is outside (0, 1], the weights do not
            match the sources, or two sources give one weight different
            shapes.
    """
    if not 0 < density <= 1:
        raise ValueError(f"ties_merge density must be in (0, 1], got {density!r}; it is the fraction of entries kept.")
    weighted = _weighted_deltas(sources, weights, "ties_merge")

    merged: Tree = {}
    for weight_key, deltas in weighted.items():
        trimmed = torch.stack([_keep_largest(delta, density) for delta in deltas])
        elected = torch.sign(trimmed.sum(dim=0))
        agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)
        count = agrees.sum(dim=0).clamp(min=1)
        merged[weight_key] = torch.where(agrees, trimmed, torch.zeros_like(trimmed)).sum(dim=0) / count
    return merged


def dare_merge(
    sources: Sequence[LoRASource],
    *,
    drop_probability: float,
    weights: Sequence[float] | None = None,
    generator: torch.Generator | None = None,
) -> Tree:
    """Merge adapters with DARE (drop and rescale) on their dense updates.

    For each weight key, the result is

        sum_i w_i * (m_i * delta_i) / (1 - p)

    where ``delta_i`` is source ``i``'s dense update (see
    ``dense_deltas``), ``p`` is ``drop_probability`` and ``m_i`` is a
    random 0/1 mask that keeps each entry with probability ``1 - p``. The
    rescaling by ``1 / (1 - p)`` keeps the expected value of each term equal
    to ``w_i * delta_i``. A source that does not adapt the module takes no
    part.

    Masks are drawn in a fixed order, so a seeded ``generator`` makes the
    result reproducible: weight keys in sorted order, and for each key the
    sources in order, each with one
    ``torch.rand(delta.shape, generator=generator, device=generator.device)``
    in float32. An entry is kept where that draw is ``>= p``. Without a
    generator the draws come from PyTorch's global CPU generator.

    The result is dense, as with ``ties_merge`` and for the same reason.

    Args:
        sources: ``(config, adapter)`` pairs.
        drop_probability: the probability ``p`` of dropping each entry, in [0, 1).
        weights: one weight per source; all 1 when omitted.
        generator: the random generator for the masks.

    Returns:
        A new dict mapping each adapted weight key to its merged delta.

    Raises:
        ValueError: if ``drop_probability`` is outside [0, 1), the weights do
            not match the sources, or two sources give one weight different
            shapes.
    """
    if not 0 <= drop_probability < 1:
        raise ValueError(f"dare_merge drop_probability must be in [0, 1), got {drop_probability!r}.")
    weighted = _weighted_deltas(sources, weights, "dare_merge")
    draw_device = generator.device if generator is not None else torch.device("cpu")

    merged: Tree = {}
    for weight_key in sorted(weighted):
        total = None
        for delta in weighted[weight_key]:
            draws = torch.rand(delta.shape, generator=generator, device=draw_device, dtype=torch.float32)
            keep = (draws >= drop_probability).to(delta.device)
            kept = torch.where(keep, delta / (1 - drop_probability), torch.zeros_like(delta))
            total = kept if total is None else total + kept
        merged[weight_key] = total
    return {key: merged[key] for key in weighted}


def deltas_to_lora(
    deltas: Mapping[str, torch.Tensor], rank: int, *, fan_in_fan_out: bool = False
) -> tuple[LoRAConfig, Tree]:
    """Factor dense weight deltas into a LoRA adapter with a truncated SVD.

    For each ``<module>.weight`` key, with the delta as ``(out, in)``
    (transposed first when ``fan_in_fan_out``) and its SVD
    ``U diag(S) V^T``, the adapter keeps ``k = min(rank, out, in)`` singular
    triplets: ``B = U_k diag(sqrt(S_k))`` and ``A = diag(sqrt(S_k)) V_k^T``,
    with scale 1. ``B @ A`` is the best rank-``k`` approximation of the
    delta. The SVD of the dense matrix runs in float32, or in the delta's
    dtype if that is wider.

    Args:
        deltas: dense deltas keyed by weight key, as ``ties_merge``,
            ``dare_merge`` and ``dense_deltas`` return them.
        rank: the maximum rank per module, at least 1.
        fan_in_fan_out: True when the weights are stored ``(in, out)``.

    Returns:
        A new ``(config, adapter)``. The leaves are float32 for float16 and
        bfloat16 deltas and keep the delta's dtype otherwise, as
        ``inject`` chooses them.

    Raises:
        ValueError: if ``rank`` is not a positive integer, a key does not end
            in ``weight``, or a delta is not 2-D.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"deltas_to_lora needs a positive integer rank, got {rank!r}.")
    if not deltas:
        raise ValueError("deltas_to_lora got no deltas; pass a dict such as ties_merge returns.")

    adapter: Tree = {}
    ranks: dict[str, int] = {}
    for weight_key, delta in deltas.items():
        module, _, name = weight_key.rpartition(".")
        if name != "weight":
            raise ValueError(f"deltas_to_lora key {weight_key!r} does not end in 'weight'; key each delta by the weight it changes.")
        if delta.ndim != 2:
            raise ValueError(f"The delta of {weight_key!r} has shape {tuple(delta.shape)}; LoRA needs a 2-D delta.")

        matrix = delta.T if fan_in_fan_out else delta
        compute = torch.promote_types(delta.dtype, torch.float32)
        u, singular, vh = torch.linalg.svd(matrix.to(compute), full_matrices=False)
        kept = min(rank, singular.shape[0])
        root = singular[:kept].sqrt()
        dtype = adapter_dtype(delta.dtype)
        adapter[_leaf_key(module, "lora_A")] = (root[:, None] * vh[:kept]).to(dtype)
        adapter[_leaf_key(module, "lora_B")] = (u[:, :kept] * root).to(dtype)
        ranks[module] = kept

    return _unit_scale_config(ranks, fan_in_fan_out=fan_in_fan_out, dropout=0.0, init="kaiming_uniform"), adapter


def add_deltas(tree: Mapping[str, torch.Tensor], deltas: Mapping[str, torch.Tensor]) -> Tree:
    """Return a new tree with each delta added to the weight of the same key.

    The sum is computed in the delta's precision and rounded once to the
    weight's dtype, as ``merge`` rounds it. Keys without a
    delta keep the caller's tensors.

    Raises:
        KeyError: if a delta's key is not in ``tree``.
        ValueError: if a delta's shape differs from its weight's.
    """
    missing = sorted(set(deltas) - tree.keys())
    if missing:
        raise KeyError(f"add_deltas: the tree has no weight {', '.join(repr(key) for key in missing[:5])}; check the key names.")

    updated: Tree = dict(tree)
    for key, delta in deltas.items():
        weight = tree[key]
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(
                f"The delta of {key!r} has shape {tuple(delta.shape)} but the weight has {tuple(weight.shape)}; "
                "check that the adapter was made for this model and its fan_in_fan_out setting."
            )
        updated[key] = add_delta(weight, delta.to(torch.promote_types(delta.dtype, torch.float32)))
    return updated


def _leaf_key(module: str, name: str) -> str:
    return f"{module}.{name}" if module else name


def _weight_key(module: str) -> str:
    return f"{module}.weight" if module else "weight"


def _lora_pairs(config: LoRAConfig, adapter: Mapping[str, torch.Tensor], label: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return ``{module: (A, B)}`` in the adapter's key order, after checking keys and shapes against the config."""
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"{label}: expected a LoRAConfig, got {type(config).__name__}; adapter arithmetic covers LoRA only.")
    # NOTE: the bias leaf of lora_bias=True adapters is not combined yet, so such configs are rejected.
    if getattr(config.params, "lora_bias", False):
        raise ValueError(
            f"{label}: the config has lora_bias=True, which adapter arithmetic does not support; "
            "merge the adapter into the base tree with LoRA(config).merge instead."
        )
    # NOTE: DoRA's magnitude is not linear in the update, and embedding and expert leaves use other layouts.
    unsupported = [
        name
        for name, value in (
            ("use_dora=True", config.params.use_dora),
            ("embedding_pattern", config.embedding_pattern is not None),
            ("parameter_pattern", config.parameter_pattern is not None),
        )
        if value
    ]
    if unsupported:
        raise ValueError(
            f"{label}: the config sets {', '.join(unsupported)}, which adapter arithmetic does not support; it combines "
            "LoRA on linear and convolution weights only. Merge the adapter into the base tree with LoRA(config).merge instead."
        )

    leaves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.items():
        module, _, name = key.rpartition(".")
        if name not in _LEAF_NAMES:
            raise ValueError(
                f"{label}: key {key!r} is not a LoRA leaf. Pass only the lora_A and lora_B leaves, for example "
                "ftpeft.select(tree, method.adapter_keys(tree))."
            )
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{label}: {key!r} is a {type(value).__name__}, not a tensor; adapter arithmetic needs values.")
        leaves.setdefault(module, {})[name] = value
    if not leaves:
        raise ValueError(f"{label} contains no LoRA leaves; pass the lora_A and lora_B leaves of an adapter.")

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, named in leaves.items():
        missing = [name for name in _LEAF_NAMES if name not in named]
        if missing:
            raise ValueError(f"{label}: module {module!r} has no {_leaf_key(module, missing[0])!r}; an adapter needs both lora_A and lora_B.")
        lora_a, lora_b = named["lora_A"], named["lora_B"]
        rank = config.rank_of(module)
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise ValueError(
                f"{label}: LoRA leaves of {module!r} have shapes {tuple(lora_a.shape)} (lora_A) and "
                f"{tuple(lora_b.shape)} (lora_B), but the config gives this module r={rank}, which needs "
                f"({rank}, in) and (out, {rank}). Pass the config the adapter was made with."
            )
        pairs[module] = (lora_a, lora_b)
    return pairs


def _common_fan_in_fan_out(sources: Sequence[LoRASource], pairs: Sequence[dict]) -> bool:
    first = sources[0][0].params.fan_in_fan_out
    for index, (config, _) in enumerate(sources):
        if config.params.fan_in_fan_out != first:
            module = next(iter(pairs[index]))
            raise ValueError(
                f"Source {index} has fan_in_fan_out={config.params.fan_in_fan_out} (module {module!r}), but source 0 "
                f"has fan_in_fan_out={first}. One LoRA config has one layout; combine these sources with "
                "ties_merge or dare_merge, whose dense deltas follow each weight's own layout."
            )
    return first


def _check_same_sizes(shapes: dict[str, tuple[int, int, int]], module: str, index: int, lora_a: torch.Tensor, lora_b: torch.Tensor) -> None:
    """Record the first source's ``(out, in)`` sizes of ``module`` and reject a later source that differs."""
    sizes = (lora_b.shape[0], lora_a.shape[1], index)
    first = shapes.setdefault(module, sizes)
    if first[:2] != sizes[:2]:
        raise ValueError(
            f"Module {module!r} has (out, in) = {sizes[:2]} in source {index} but {first[:2]} in source {first[2]}; "
            "adapters can be combined only if they were made for weights of the same shape."
        )


def _promoted_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _dense_deltas_of(config: LoRAConfig, modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Tree:
    transposed = config.params.fan_in_fan_out
    deltas: Tree = {}
    for module, (lora_a, lora_b) in modules.items():
        dtype = _promoted_dtype([lora_a, lora_b])
        deltas[_weight_key(module)] = lora_delta(lora_a, lora_b, config.scale_of(module), dtype, transposed=transposed)
    return deltas


def _weighted_deltas(sources: Sequence[LoRASource], weights: Sequence[float] | None, caller: str) -> dict[str, list[torch.Tensor]]:
    """Return, per weight key, ``w_i * delta_i`` of each source that adapts it, in one dtype."""
    if not sources:
        raise ValueError(f"{caller} needs at least one (config, adapter) source; got none.")
    if weights is None:
        weights = [1.0] * len(sources)
    if len(weights) != len(sources):
        raise ValueError(f"{caller} got {len(sources)} sources but {len(weights)} weights; give one weight per source.")

    weighted: dict[str, list[torch.Tensor]] = {}
    owners: dict[str, int] = {}
    for index, (config, adapter) in enumerate(sources):
        deltas = _dense_deltas_of(config, _lora_pairs(config, adapter, f"source {index}"))
        for weight_key, delta in deltas.items():
            first = weighted.get(weight_key)
            if first is not None and first[0].shape != delta.shape:
                raise ValueError(
                    f"The delta of {weight_key!r} has shape {tuple(delta.shape)} in source {index} but "
                    f"{tuple(first[0].shape)} in source {owners[weight_key]}; adapters can be merged only if they "
                    "were made for weights of the same shape."
                )
            owners.setdefault(weight_key, index)
            weighted.setdefault(weight_key, []).append(delta * float(weights[index]))

    for weight_key, deltas in weighted.items():
        dtype = _promoted_dtype(deltas)
        weighted[weight_key] = [delta.to(dtype) for delta in deltas]
    return weighted


def _keep_largest(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero every entry whose magnitude is below the ``ceil(density * n)``-th largest magnitude."""
    magnitudes = delta.abs().flatten()
    count = min(magnitudes.numel(), math.ceil(density * magnitudes.numel()))
    threshold = magnitudes.kthvalue(magnitudes.numel() - count + 1).values
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def _exact_regex(module: str) -> str:
    """Return a regex that fullmatches ``module`` and no other path (``(?:)`` for the root module)."""
    return re.escape(module) if module else "(?:)"


def _unit_scale_config(ranks: Mapping[str, int], *, fan_in_fan_out: bool, dropout: float, init: str) -> LoRAConfig:
    """Build a config that targets exactly ``ranks``' modules, with those ranks and scale 1 on each.

    ``params.r`` is the most common rank. Each other module gets a
    ``rank_pattern`` and ``alpha_pattern`` entry keyed by its escaped path.
    Such a key also fullmatches the dot-suffixes of longer paths, and the
    first matching key wins, so every module that ends in an overridden path
    gets its own entry too, and longer paths come first.
    """
    counts = Counter(ranks.values())
    default_rank = max(counts, key=lambda rank: (counts[rank], rank))

    overridden = {module for module, rank in ranks.items() if rank != default_rank}
    grew = True
    while grew:
        shadowed = {
            module
            for module in ranks
            if module not in overridden and any(other and module.endswith("." + other) for other in overridden)
        }
        overridden |= shadowed
        grew = bool(shadowed)

    ordered = sorted(overridden, key=lambda module: (-len(module.split(".")), module))
    rank_pattern = {_exact_regex(module): ranks[module] for module in ordered}
    alpha_pattern = {_exact_regex(module): float(ranks[module]) for module in ordered}
    module_pattern = "|".join(_exact_regex(module) for module in sorted(ranks))

    params = LoRAParameters(
        r=default_rank, alpha=float(default_rank), dropout=dropout, use_rslora=False, fan_in_fan_out=fan_in_fan_out, init=init
    )
    return LoRAConfig(module_name_pattern=module_pattern, params=params, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)

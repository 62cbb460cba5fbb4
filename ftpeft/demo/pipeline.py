"""The demo's five steps: plan on meta, load, train, report, merge and save.

``run_demo`` does the work and hands each line of output to a
``report`` callable, so the command decides where the lines go.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import (
    LoRAConfig,
    LoRAParameters,
    PeftMethod,
    combine,
    functional_forward,
    peft_method_from_config,
    spec_of,
    split_trainable,
)
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    LoadedWeights,
    build_on_meta,
    default_checkpoint_dir,
    load_tokenizer,
    load_weights,
    open_checkpoint,
    read_tensors,
)
from .data import Encoder, SentencePair, group_batches, load_split
from .export import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_FILE,
    CHECKPOINT_SIDE_FILES,
    MERGED_FILE,
    copy_file_atomically,
    prepare_output_dir,
    save_tensors_atomically,
    write_text_atomically,
)
from .train import RetrievalScores, evaluate, train_adapters

__all__ = ["MERGE_TOLERANCE", "DemoOptions", "DemoResult", "MergeCheckError", "run_demo"]

#: Largest |merged - adapted| on the last hidden states, relative to their largest magnitude.
#: Float32 rounding alone gave 2.4e-5 on all-MiniLM-L6-v2 after the default run
#: (each path is about 1e-5 from a float64 run). A merge that drops an adapter
#: misses by the adapters' whole change, 0.6 relative in that run.
MERGE_TOLERANCE = 1e-4

#: Sentences are truncated to this many tokens. The bundled ones have at most 15 MiniLM (BERT) tokens.
MAX_TOKENS = 64

Report = Callable[[str], None]


class MergeCheckError(Exception):
    """The merged weights do not reproduce the adapted model's outputs."""


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """Settings of one demo run; the command-line flags map onto these fields."""

    output_dir: Path
    checkpoint: Path | None = None
    steps: int = 100
    seed: int = 0
    rank: int = 8
    learning_rate: float = 1e-3
    #: Near-miss groups per training batch; each group contains two pairs.
    groups_per_batch: int = 8
    dropout: float = 0.1
    show_progress: bool = True


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """Measurements and output files of a demo run."""

    before: RetrievalScores
    after: RetrievalScores
    trainable_parameters: int
    total_parameters: int
    merge_difference: float
    output_files: list[Path]
    training_seconds: float


def run_demo(options: DemoOptions, report: Report) -> DemoResult:
    """Fine-tune a checkpoint with LoRA on the bundled paraphrase pairs, then merge and save.

    Raises:
        CheckpointError: if the checkpoint is missing, malformed or unsupported.
        OutputError: if the output directory cannot be written.
        MergeCheckError: if the merged weights miss the adapted outputs by
            more than :data:`MERGE_TOLERANCE`; nothing is saved then.
    """
    torch.manual_seed(options.seed)
    generator = torch.Generator().manual_seed(options.seed)

    directory = options.checkpoint if options.checkpoint is not None else default_checkpoint_dir()
    checkpoint = open_checkpoint(directory)
    report(f"ftpeft demo: LoRA fine-tuning of the {checkpoint.family.name} checkpoint in {directory}")
    tokenizer = load_tokenizer(checkpoint)

    report("")
    report("Step 1/5: plan LoRA on the meta device")
    plan = _plan(checkpoint, options, report)

    report("")
    report("Step 2/5: load the weights")
    loaded = _load(checkpoint, plan.model, report)
    tree = plan.method.inject(loaded.tree, generator=generator)
    trainable, frozen = split_trainable(plan.method, tree)
    forward = functional_forward(plan.model, plan.method)

    report("")
    report("Step 3/5: train the adapters")
    encoder = Encoder(tokenizer, max_length=_max_tokens(checkpoint), vocab_size=_vocab_size(plan.model), source=directory)
    forward_kwargs = dict(checkpoint.family.forward_kwargs)
    heldout_pairs = load_split("heldout")
    before, after, training_seconds = _train_and_evaluate(
        options, plan.model, forward, trainable, frozen, encoder, forward_kwargs, heldout_pairs, generator, report
    )

    report("")
    report("Step 4/5: held-out results")
    trainable_count = sum(tensor.numel() for tensor in trainable.values())
    _report_results(before, after, trainable_count, plan.total_count, report)

    report("")
    report("Step 5/5: merge and save")
    merged = plan.method.merge(combine(trainable, frozen))
    check = _check_merge(plan.model, forward, (trainable, frozen), merged, loaded.tree, encoder, heldout_pairs, forward_kwargs)
    _report_merge_check(check, report)
    output_files = _save_outputs(options.output_dir, checkpoint, loaded, trainable, merged, plan.config)
    report(f"  Wrote to {options.output_dir}: {', '.join(path.name for path in output_files)}.")

    return DemoResult(
        before=before,
        after=after,
        trainable_parameters=trainable_count,
        total_parameters=plan.total_count,
        merge_difference=check.difference,
        output_files=output_files,
        training_seconds=training_seconds,
    )


@dataclasses.dataclass(frozen=True)
class _Plan:
    model: nn.Module
    config: LoRAConfig
    method: PeftMethod
    #: Parameters of the base model plus the planned adapter leaves.
    total_count: int


def _plan(checkpoint: Checkpoint, options: DemoOptions, report: Report) -> _Plan:
    """Build the model on meta and plan LoRA on its spec; no weight memory is allocated."""
    model = build_on_meta(checkpoint)
    config = LoRAConfig(
        module_name_pattern=checkpoint.family.lora_pattern,
        params=LoRAParameters(
            r=options.rank,
            alpha=2.0 * options.rank,
            dropout=options.dropout,
            fan_in_fan_out=checkpoint.family.fan_in_fan_out,
        ),
    )
    method = peft_method_from_config(config)
    base_spec = spec_of(model)
    try:
        planned = method.inject(base_spec)
    except ValueError as error:
        raise CheckpointError(f"LoRA cannot be planned on the model in {checkpoint.directory}: {error}") from None

    planned_count = sum(math.prod(planned[key].shape) for key in method.trainable_keys(planned))
    base_count = sum(parameter.numel() for parameter in model.parameters())
    total_count = base_count + planned_count
    report(
        f"  Built {type(model).__name__} from config.json: {base_count:,} parameters on meta, "
        f"{_real_parameter_bytes(model)} bytes of weight memory allocated."
    )
    report(
        f"  LoRA r={options.rank}, alpha={config.params.alpha:g}, dropout={options.dropout:g} targets "
        f"{len(method.targets(base_spec))} modules; planned trainable parameters: {planned_count:,} "
        f"({_percent(planned_count, total_count)} of {total_count:,})."
    )
    return _Plan(model=model, config=config, method=method, total_count=total_count)


def _load(checkpoint: Checkpoint, model: nn.Module, report: Report) -> LoadedWeights:
    loaded = load_weights(checkpoint, model)
    file_names = ", ".join(path.name for path in loaded.files)
    report(f"  Loaded the {len(loaded.tree)} tensors the model uses from {file_names}; floating-point tensors are float32.")
    if loaded.module_buffers:
        report(f"  Non-persistent buffers keep the values the module computed: {', '.join(loaded.module_buffers)}.")
    if loaded.unused_keys:
        report(f"  Checkpoint tensors the base model does not use (kept in the merged file): {_preview(loaded.unused_keys)}.")
    return loaded


def _train_and_evaluate(
    options: DemoOptions,
    model: nn.Module,
    forward: Callable[..., Any],
    trainable: dict[str, torch.Tensor],
    frozen: Mapping[str, torch.Tensor],
    encoder: Encoder,
    forward_kwargs: Mapping[str, Any],
    heldout_pairs: list[SentencePair],
    generator: torch.Generator,
    report: Report,
) -> tuple[RetrievalScores, RetrievalScores, float]:
    """Score the held-out pairs, train the adapters in place, score again; return both scores and the training time."""
    train_pairs = load_split("train")
    report(
        f"  Data: {len(train_pairs)} train pairs in {_group_count(train_pairs)} near-miss groups, "
        f"{len(heldout_pairs)} held-out pairs in {_group_count(heldout_pairs)} groups."
    )
    before = evaluate(model, forward, (trainable, frozen), heldout_pairs, encoder, forward_kwargs)
    report(f"  Held-out before training: {_scores(before)}")

    started = time.perf_counter()
    losses = train_adapters(
        model,
        forward,
        trainable,
        frozen,
        group_batches(train_pairs, options.groups_per_batch, generator),
        encoder,
        steps=options.steps,
        learning_rate=options.learning_rate,
        forward_kwargs=forward_kwargs,
        show_progress=options.show_progress,
    )
    training_seconds = time.perf_counter() - started
    last = losses[-10:]
    report(
        f"  Trained {options.steps} steps of {options.groups_per_batch} groups ({2 * options.groups_per_batch} pairs) "
        f"at learning rate {options.learning_rate:g} in {training_seconds:.1f} s; "
        f"mean loss of the last {len(last)} steps {sum(last) / len(last):.3f}."
    )

    after = evaluate(model, forward, (trainable, frozen), heldout_pairs, encoder, forward_kwargs)
    report(f"  Held-out after training:  {_scores(after)}")
    return before, after, training_seconds


def _report_results(before: RetrievalScores, after: RetrievalScores, trainable_count: int, total_count: int, report: Report) -> None:
    report(f"  {'metric':<22}{'before':>10}{'after':>10}")
    report(f"  {'top-1 accuracy':<22}{before.accuracy:>10.1%}{after.accuracy:>10.1%}")
    report(f"  {'mean reciprocal rank':<22}{before.mrr:>10.3f}{after.mrr:>10.3f}")
    report(f"  {'contrastive loss':<22}{before.loss:>10.3f}{after.loss:>10.3f}")
    report(f"  Trainable parameters: {trainable_count:,} of {total_count:,} ({_percent(trainable_count, total_count)}).")


def _report_merge_check(check: _MergeCheck, report: Report) -> None:
    """Report the merge check; raise ``MergeCheckError`` if it exceeds the tolerance."""
    report(
        f"  Merged vs adapted outputs on the held-out set: relative difference {check.relative_difference:.1e} "
        f"(tolerance {MERGE_TOLERANCE:.0e}); max |merged - adapted| {check.difference:.2e} for hidden states up to {check.scale:.2f}."
    )
    report(f"  For scale, the trained adapters move those hidden states by up to {check.adapter_change:.3f}.")
    if not check.relative_difference <= MERGE_TOLERANCE:
        raise MergeCheckError(
            f"The merged weights miss the adapted outputs by {check.difference:.3e} ({check.relative_difference:.1e} "
            f"relative), more than the tolerance {MERGE_TOLERANCE:.0e}; nothing was saved. Report this with the "
            "command line that produced it."
        )


@dataclasses.dataclass(frozen=True)
class _MergeCheck:
    difference: float
    scale: float
    adapter_change: float

    @property
    def relative_difference(self) -> float:
        return self.difference / max(self.scale, 1e-12)


def _check_merge(
    model: nn.Module,
    forward: Callable[..., Any],
    trees: tuple[Mapping[str, torch.Tensor], ...],
    merged: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    encoder: Encoder,
    pairs: list[SentencePair],
    forward_kwargs: Mapping[str, Any],
) -> _MergeCheck:
    """Compare the last hidden states of the adapted model, the merged weights and the base weights."""
    plain_forward = functional_forward(model, None)
    sentences = [pair.sentence1 for pair in pairs] + [pair.sentence2 for pair in pairs]
    inputs = encoder(sentences)
    model.eval()
    with torch.no_grad():
        adapted = forward(trees, **inputs, **forward_kwargs).last_hidden_state
        from_merged = plain_forward(merged, **inputs, **forward_kwargs).last_hidden_state
        from_base = plain_forward(base, **inputs, **forward_kwargs).last_hidden_state
    return _MergeCheck(
        difference=float((adapted - from_merged).abs().max()),
        scale=float(adapted.abs().max()),
        adapter_change=float((adapted - from_base).abs().max()),
    )


def _save_outputs(
    output_dir: Path,
    checkpoint: Checkpoint,
    loaded: LoadedWeights,
    trainable: Mapping[str, torch.Tensor],
    merged: Mapping[str, torch.Tensor],
    config: LoRAConfig,
) -> list[Path]:
    """Write the adapter, its config and a complete merged checkpoint into ``output_dir``.

    The merged file uses the input checkpoint's key names, with its
    base-model prefix if it had one. It also carries over the checkpoint
    tensors the base model does not use, such as a language-model head, so the
    output directory loads like the input one.
    """
    prepare_output_dir(output_dir, checkpoint.directory)

    merged_file: dict[str, torch.Tensor] = {loaded.checkpoint_keys.get(key, key): value for key, value in merged.items()}
    carried = [key for key in loaded.unused_keys if key not in merged_file]
    merged_file.update(read_tensors(loaded.locations, carried))

    written: list[Path] = []
    save_tensors_atomically(output_dir / ADAPTER_FILE, dict(trainable))
    written.append(output_dir / ADAPTER_FILE)
    write_text_atomically(output_dir / ADAPTER_CONFIG_FILE, config.model_dump_json(indent=2) + "\n")
    written.append(output_dir / ADAPTER_CONFIG_FILE)
    save_tensors_atomically(output_dir / MERGED_FILE, merged_file)
    written.append(output_dir / MERGED_FILE)
    for name in CHECKPOINT_SIDE_FILES:
        source = checkpoint.directory / name
        if source.is_file():
            copy_file_atomically(source, output_dir / name)
            written.append(output_dir / name)
    return written


def _real_parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)


def _vocab_size(model: nn.Module) -> int:
    embeddings = model.get_input_embeddings()
    return int(embeddings.num_embeddings) if isinstance(embeddings, nn.Embedding) else int(model.config.vocab_size)


def _max_tokens(checkpoint: Checkpoint) -> int:
    positions = getattr(checkpoint.config, "max_position_embeddings", None) or getattr(checkpoint.config, "n_positions", None)
    return min(MAX_TOKENS, positions) if positions else MAX_TOKENS


def _group_count(pairs: list[SentencePair]) -> int:
    return len({pair.group for pair in pairs})


def _scores(scores: RetrievalScores) -> str:
    return f"top-1 accuracy {scores.accuracy:.1%}, MRR {scores.mrr:.3f}, loss {scores.loss:.3f}"


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.2%}" if whole else "n/a"


def _preview(keys: list[str], limit: int = 4) -> str:
    listed = ", ".join(keys[:limit])
    return listed + (f" and {len(keys) - limit} more" if len(keys) > limit else "")

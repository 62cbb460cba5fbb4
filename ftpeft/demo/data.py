"""The bundled paraphrase pairs, group-aware batching and tokenisation.

Each line of ``data/train.jsonl`` and ``data/heldout.jsonl`` is one pair::

    {"group": "heldout-002", "sentence1": "Grace did not remember her friend's birthday.",
     "sentence2": "Grace forgot her friend's birthday."}

Pairs come in groups of two near misses. The two first sentences share
their topic words but differ in meaning, through negation, an antonym,
before and after, who did what to whom, or a comparison or quantity turned
around. Each second sentence rewords its first one. A pretrained sentence encoder
tends to match on the shared words, so it often ranks the other pair's
rewording first. The held-out groups use sentences that the train split does
not contain.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError

__all__ = ["SPLITS", "Encoder", "SentencePair", "group_batches", "load_split", "read_pairs"]

SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class SentencePair:
    """Two sentences with the same meaning, and the near-miss group they belong to."""

    sentence1: str
    sentence2: str
    group: str


def load_split(name: str) -> list[SentencePair]:
    """Load a bundled split, ``"train"`` or ``"heldout"``."""
    if name not in SPLITS:
        raise ValueError(f"Unknown split {name!r}; the bundled splits are {', '.join(SPLITS)}.")
    resource = importlib.resources.files("ftpeft.demo") / "data" / f"{name}.jsonl"
    return read_pairs(resource.read_text(encoding="utf-8"), source=str(resource))


def read_pairs(text: str, *, source: str) -> list[SentencePair]:
    """Parse JSON lines of ``{"group", "sentence1", "sentence2"}``; blank lines are skipped.

    Raises:
        ValueError: naming ``source`` and the line that is not such an object.
    """
    pairs: list[SentencePair] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}, line {number}: invalid JSON ({error}).") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(field), str) and record[field] for field in ("group", "sentence1", "sentence2")):
            raise ValueError(f"{source}, line {number}: expected an object with non-empty strings 'group', 'sentence1' and 'sentence2'.")
        pairs.append(SentencePair(sentence1=record["sentence1"], sentence2=record["sentence2"], group=record["group"]))
    if not pairs:
        raise ValueError(f"{source} contains no sentence pairs.")
    return pairs


def group_batches(pairs: Sequence[SentencePair], groups_per_batch: int, generator: torch.Generator) -> Iterator[list[SentencePair]]:
    """Yield batches of whole groups forever, reshuffling the groups each epoch.

    Keeping a group in one batch puts each pair's near miss in the batch as a
    hard negative for the in-batch contrastive loss. The last batch of an
    epoch may hold fewer groups.
    """
    if groups_per_batch < 1:
        raise ValueError(f"groups_per_batch must be at least 1, got {groups_per_batch}.")
    groups: dict[str, list[SentencePair]] = {}
    for pair in pairs:
        groups.setdefault(pair.group, []).append(pair)
    names = list(groups)

    while True:
        order = torch.randperm(len(names), generator=generator).tolist()
        for start in range(0, len(order), groups_per_batch):
            yield [pair for index in order[start : start + groups_per_batch] for pair in groups[names[index]]]


class Encoder:
    """Tokenises sentences into padded ``input_ids`` and ``attention_mask`` tensors."""

    def __init__(self, tokenizer: Any, max_length: int, vocab_size: int, source: Path):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.vocab_size = vocab_size
        self.source = source

    def __call__(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        """Return the padded ids and mask of ``sentences``.

        Raises:
            CheckpointError: if the tokenizer yields an id outside the model's
                vocabulary (the tokenizer and the weights do not belong together).
        """
        batch = self.tokenizer(
            list(sentences),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        input_ids = batch["input_ids"]
        largest = int(input_ids.max())
        if largest >= self.vocab_size:
            raise CheckpointError(
                f"The tokenizer in {self.source} produced token id {largest}, but the model's vocabulary has "
                f"{self.vocab_size} entries; use the tokenizer that belongs to these weights."
            )
        return {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}

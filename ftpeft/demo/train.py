"""Sentence embeddings, the in-batch contrastive loss, retrieval scores and the training loop.

Only the adapter leaves are trained. ``torch.func.grad`` differentiates the
loss with respect to the trainable tree alone, and a plain
``torch.optim.AdamW`` applies the gradients to those tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import Encoder, SentencePair

__all__ = [
    "TEMPERATURE",
    "RetrievalScores",
    "contrastive_loss",
    "evaluate",
    "sentence_embeddings",
    "train_adapters",
]

#: Softmax temperature of the contrastive loss: cosine similarities are divided by it.
TEMPERATURE = 0.05

Forward = Callable[..., Any]
Trees = tuple[Mapping[str, torch.Tensor], ...]


def sentence_embeddings(
    forward: Forward,
    trees: Trees,
    inputs: Mapping[str, torch.Tensor],
    forward_kwargs: Mapping[str, Any],
) -> torch.Tensor:
    """Run the model and mean-pool its last hidden states into unit-length sentence embeddings.

    With hidden states ``h_t`` and attention mask ``m_t`` (1 for a real
    token, 0 for padding), a sentence's embedding is
    ``e = sum_t m_t h_t / sum_t m_t``, divided by its L2 norm.
    """
    output = forward(trees, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **forward_kwargs)
    hidden = output.last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
    return F.normalize(pooled, dim=-1)


def contrastive_loss(first: torch.Tensor, second: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Return the symmetric in-batch contrastive (InfoNCE) loss of ``n`` paired unit embeddings.

    Row ``i`` of ``first`` (``u_i``) and of ``second`` (``v_i``) embed the two
    sentences of pair ``i``; every other pair in the batch is a negative. With
    logits ``S_ij = (u_i . v_j) / temperature``::

        L = 1/2 * [ 1/n sum_i -log( exp(S_ii) / sum_j exp(S_ij) )
                  + 1/n sum_j -log( exp(S_jj) / sum_i exp(S_ij) ) ]

    The first term retrieves each second sentence from its first, the second
    term the reverse. Both are cross-entropy with the diagonal as the target.
    """
    logits = first @ second.T / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _pair_embeddings(
    forward: Forward,
    trees: Trees,
    pairs: Sequence[SentencePair],
    encoder: Encoder,
    forward_kwargs: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    # One forward over both sides: the 2n sentences are padded together.
    sentences = [pair.sentence1 for pair in pairs] + [pair.sentence2 for pair in pairs]
    embeddings = sentence_embeddings(forward, trees, encoder(sentences), forward_kwargs)
    return embeddings[: len(pairs)], embeddings[len(pairs) :]


@dataclasses.dataclass(frozen=True)
class RetrievalScores:
    """Retrieval quality on a set of pairs, each sentence querying all partners of its opposite side."""

    #: Share of the 2n queries whose nearest partner is its own pair (top-1 accuracy).
    accuracy: float
    #: Mean reciprocal rank of the own pair among all partners.
    mrr: float
    #: ``contrastive_loss`` with all pairs in one batch.
    loss: float


def evaluate(
    model: nn.Module,
    forward: Forward,
    trees: Trees,
    pairs: Sequence[SentencePair],
    encoder: Encoder,
    forward_kwargs: Mapping[str, Any],
) -> RetrievalScores:
    """Score retrieval on ``pairs`` with dropout off: each sentence1 retrieves among all sentence2, and the reverse."""
    model.eval()
    with torch.no_grad():
        first, second = _pair_embeddings(forward, trees, pairs, encoder, forward_kwargs)
        similarities = first @ second.T
        own = similarities.diagonal()

        # Rank of the own partner = 1 + the number of partners scored strictly higher.
        ranks_from_first = 1 + (similarities > own.unsqueeze(1)).sum(dim=1)
        ranks_from_second = 1 + (similarities > own.unsqueeze(0)).sum(dim=0)
        ranks = torch.cat([ranks_from_first, ranks_from_second]).double()
        loss = contrastive_loss(first, second)

    return RetrievalScores(
        accuracy=float((ranks == 1).double().mean()),
        mrr=float((1.0 / ranks).mean()),
        loss=float(loss),
    )


def train_adapters(
    model: nn.Module,
    forward: Forward,
    trainable: dict[str, torch.Tensor],
    frozen: Mapping[str, torch.Tensor],
    batches: Iterator[list[SentencePair]],
    encoder: Encoder,
    *,
    steps: int,
    learning_rate: float,
    forward_kwargs: Mapping[str, Any],
    show_progress: bool = True,
) -> list[float]:
    """Train the ``trainable`` leaves for ``steps`` batches and return the loss of each step.

    Each step computes ``torch.func.grad`` of ``contrastive_loss`` with
    respect to ``trainable`` only, stores each gradient as the ``.grad`` of its
    tensor and takes one AdamW step (weight decay 0). The optimizer updates the
    tensors of ``trainable`` in place, so the dict contains the trained values
    afterwards. ``frozen`` is never changed. The model is in training mode
    during the loop (dropout in the model and the adapters is on) and in
    evaluation mode afterwards.
    """

    def batch_loss(trainable_tree: Mapping[str, torch.Tensor], batch: list[SentencePair]) -> torch.Tensor:
        first, second = _pair_embeddings(forward, (trainable_tree, frozen), batch, encoder, forward_kwargs)
        return contrastive_loss(first, second)

    loss_and_grads = torch.func.grad_and_value(batch_loss)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=learning_rate, weight_decay=0.0)
    losses: list[float] = []

    model.train()
    try:
        with tqdm(total=steps, desc="training", unit="step", disable=not show_progress, dynamic_ncols=True) as progress:
            for _ in range(steps):
                grads, loss = loss_and_grads(trainable, next(batches))
                for key, tensor in trainable.items():
                    tensor.grad = grads[key]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

                losses.append(float(loss))
                progress.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                progress.update()
    finally:
        model.eval()
    return losses

"""Shared fixtures: small models and trees used across the test modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TwoLayerMLP(nn.Module):
    """A small MLP whose layers are reached through F.linear."""

    def __init__(self, d_in: int = 6, d_hidden: int = 10, d_out: int = 4):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden)
        self.down = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


@pytest.fixture
def mlp() -> TwoLayerMLP:
    return TwoLayerMLP()


def tiny_llama(num_layers: int = 2, tie: bool = False):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config).eval()


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return a detached copy of the model's state, as a user's loaded checkpoint would be."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomise_lora_b(tree: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Return a new tree whose lora_B leaves are random, so adapters change the output."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: (torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype) * 0.1 if k.endswith("lora_B") else v)
        for k, v in tree.items()
    }


def result_shapes(run) -> list[tuple[int, ...]]:
    """Call ``run()`` and return the shapes of the tensors its torch calls return, except views made with ``view``.

    The forward passes each targeted weight as a ``view`` of itself, so any
    other result of the weight's shape is a dense update being built.
    """
    shapes: list[tuple[int, ...]] = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and func is not torch.Tensor.view:
                shapes.append(tuple(result.shape))
            return result

    with Recorder():
        run()
    return shapes


def copy_into_peft(peft_model, tree) -> int:
    """Copy ftpeft's lora_A / lora_B leaves into every LoRA layer of a peft model; return how many layers."""
    from peft.tuners.lora import LoraLayer

    copied = 0
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, LoraLayer):
                module.lora_A["default"].weight.copy_(tree[f"{name}.lora_A"])
                module.lora_B["default"].weight.copy_(tree[f"{name}.lora_B"])
                copied += 1
    return copied

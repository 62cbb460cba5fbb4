"""Training-step time of ftpeft against Hugging Face PEFT and against the frozen model's own step.

Builds a transformers Llama from a config (hidden 512, intermediate 1408, 6
layers, 8 heads, vocab 8000) and LoRA r = 16, alpha = 32 on q, k, v, o,
gate, up and down projections. Each step is a forward and backward pass of
the causal language-modelling loss. The contenders run interleaved in one
process (A B C A B C ...), and the script prints the median of --runs timed
steps after --warmup untimed ones, and the ratios.

- ftpeft: `functional_forward` with the trainable leaves requiring grad,
  then `loss.backward()`, as a training loop with `torch.optim` runs it;
- ftpeft func.grad: `torch.func.grad` of the same loss;
- peft: `get_peft_model`, then `loss.backward()`;
- limit: the same model with every parameter frozen and gradients only for
  the input embeddings, which no adapter method can beat.

Usage:
  python benchmarks/train_step.py                      # B1: batch 4 x 256, dropout 0
  python benchmarks/train_step.py --dropout 0.1        # B2
  python benchmarks/train_step.py --batch 1 --seq 32   # B3
  python benchmarks/train_step.py --compile            # B7: adds compiled contenders
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model():
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=8000,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def ftpeft_step(model, dropout: float, compile_graph: bool, use_func_grad: bool = False):
    from ftpeft import LoRAConfig, LoRAParameters, functional_forward, peft_method_from_config, split_trainable

    method = peft_method_from_config(LoRAConfig(module_name_pattern=TARGETS, params=LoRAParameters(r=16, alpha=32, dropout=dropout)))
    tree = method.inject({k: v.detach() for k, v in model.state_dict().items()}, generator=torch.Generator().manual_seed(0))
    trainable, frozen = split_trainable(method, tree)
    fn = functional_forward(model, method)

    def loss(trainable, frozen, ids):
        return fn((trainable, frozen), input_ids=ids, labels=ids).loss

    if use_func_grad:
        grad = torch.func.grad(loss)
        if compile_graph:
            grad = torch.compile(grad)
        return lambda ids: grad(trainable, frozen, ids)

    leaves = {k: v.clone().requires_grad_() for k, v in trainable.items()}
    forward = torch.compile(loss) if compile_graph else loss

    def step(ids):
        forward(leaves, frozen, ids).backward()
        for leaf in leaves.values():
            leaf.grad = None

    return step


def peft_step(model, dropout: float, compile_graph: bool):
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS))
    peft_model.train()
    forward = torch.compile(peft_model) if compile_graph else peft_model

    def step(ids):
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        for parameter in peft_model.parameters():
            parameter.grad = None

    return step


def limit_step(model):
    frozen = copy.deepcopy(model).train()
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    embed = frozen.get_input_embeddings()

    def step(ids):
        embeddings = embed(ids).detach().requires_grad_()
        frozen(inputs_embeds=embeddings, labels=ids).loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout probability")
    parser.add_argument("--runs", type=int, default=5, help="timed steps per contender (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--compile", action="store_true", help="compare torch.compile'd ftpeft and peft with eager ftpeft")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model().train()
    ids = torch.randint(0, 8000, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    if args.compile:
        contenders = {
            "ftpeft compiled": ftpeft_step(model, args.dropout, True),
            "ftpeft eager": ftpeft_step(model, args.dropout, False),
            "peft compiled": peft_step(model, args.dropout, True),
        }
    else:
        contenders = {
            "ftpeft": ftpeft_step(model, args.dropout, False),
            "peft": peft_step(model, args.dropout, False),
            "ftpeft func.grad": ftpeft_step(model, args.dropout, False, use_func_grad=True),
        }
        if args.dropout == 0:
            contenders["limit"] = limit_step(model)

    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_index in range(args.warmup + args.runs):
        for name, step in contenders.items():
            start = time.perf_counter()
            step(ids)
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)

    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"batch {args.batch} x {args.seq}, dropout {args.dropout}, threads {args.threads}, torch {torch.__version__}, median of {args.runs}")
    for name, median in medians.items():
        print(f"{name:18} {median * 1000:9.1f} ms")
    names = list(medians)
    for other in names[1:]:
        print(f"{names[0]} / {other}: {medians[names[0]] / medians[other]:.3f}")
    if "peft" in medians:
        print(f"ftpeft func.grad / peft: {medians['ftpeft func.grad'] / medians['peft']:.3f}")


if __name__ == "__main__":
    main()

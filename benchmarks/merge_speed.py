"""B5: merging every LoRA adapter of a 1 GB bfloat16 model, ftpeft against peft and a plain copy.

Builds a bfloat16 transformers Llama of about 1.1 GB (8 layers, hidden 2048,
intermediate 5632, vocab 32000) with LoRA r = 16 on q, k, v, o, gate, up
and down projections (random B, so every merge changes the weights), then
times, interleaved:

- ftpeft: `method.merge(tree)`, which returns new tensors for the 56 adapted
  weights (update in float32, rounded once) and passes the rest through;
- peft: `merge_and_unload()` on a fresh copy of the peft model each time
  (the copy is not timed);
- copy: `tensor.clone()` of every base tensor, the cost of touching the
  bytes once.

Usage: python benchmarks/merge_speed.py [--runs 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft
    import transformers

    from ftpeft import LoRAConfig, LoRAParameters, peft_method_from_config

    config = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)

    method = peft_method_from_config(LoRAConfig(module_name_pattern=TARGETS, params=LoRAParameters(r=16, alpha=32)))
    base = {k: v.detach() for k, v in model.state_dict().items()}
    tree = method.inject(base, generator=generator)
    tree = {k: (torch.randn(v.shape, generator=generator) * 0.01 if k.endswith("lora_B") else v) for k, v in tree.items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_A["default"].weight.copy_(tree[f"{name}.lora_A"])
                module.lora_B["default"].weight.copy_(tree[f"{name}.lora_B"])

    total_bytes = sum(v.numel() * v.element_size() for v in base.values())
    times: dict[str, list[float]] = {"ftpeft merge": [], "peft merge_and_unload": [], "copy": []}
    for round_index in range(args.runs + 1):
        start = time.perf_counter()
        merged = method.merge(tree)
        times["ftpeft merge"].append(time.perf_counter() - start)
        del merged

        fresh = copy.deepcopy(peft_model)
        start = time.perf_counter()
        fresh.merge_and_unload()
        times["peft merge_and_unload"].append(time.perf_counter() - start)
        del fresh

        start = time.perf_counter()
        copied = {k: v.clone() for k, v in base.items()}
        times["copy"].append(time.perf_counter() - start)
        del copied

    medians = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(f"bfloat16 Llama, {total_bytes / 1e9:.2f} GB, LoRA r=16 on 56 modules, torch {torch.__version__}, median of {args.runs}")
    for name, median in medians.items():
        print(f"{name:22} {median * 1000:9.1f} ms")
    print(f"ftpeft / copy: {medians['ftpeft merge'] / medians['copy']:.3f}")
    print(f"ftpeft / peft: {medians['ftpeft merge'] / medians['peft merge_and_unload']:.3f}")


if __name__ == "__main__":
    main()

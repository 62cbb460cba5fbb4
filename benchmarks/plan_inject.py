"""B6: planning LoRA on a meta-device Llama of 7B shape, ftpeft against peft.

Builds `LlamaForCausalLM` with 32 layers, hidden 4096, intermediate 11008
and vocab 32000 on the meta device, then times, interleaved:

- ftpeft: `method.inject(spec_of(model))` for LoRA r = 16 on q, k, v, o,
  gate, up and down projections;
- peft: `get_peft_model(model, config, low_cpu_mem_usage=True)` on a fresh
  meta model each time (peft modifies the model it wraps; building it is
  not timed).

It checks that neither allocated tensor data (every leaf stays on meta) and
prints the medians and their ratio.

Usage: python benchmarks/plan_inject.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def meta_llama():
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per contender (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import peft

    from ftpeft import LoRAConfig, LoRAParameters, peft_method_from_config, spec_of

    method = peft_method_from_config(LoRAConfig(module_name_pattern=TARGETS, params=LoRAParameters(r=16, alpha=32)))
    peft_config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS)
    ftpeft_times, peft_times = [], []
    for round_index in range(args.runs + 1):
        model = meta_llama()
        start = time.perf_counter()
        planned = method.inject(spec_of(model))
        ftpeft_times.append(time.perf_counter() - start)
        assert all(leaf.device.type == "meta" for leaf in planned.values())

        model = meta_llama()
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(model, peft_config, low_cpu_mem_usage=True)
        peft_times.append(time.perf_counter() - start)
        assert all(p.device.type == "meta" for p in wrapped.parameters())

    ftpeft_median, peft_median = statistics.median(ftpeft_times[1:]), statistics.median(peft_times[1:])
    adapters = sum(1 for key in planned if key.endswith("lora_A"))
    print(f"meta Llama 7B shape, LoRA r=16 on {adapters} modules, torch {torch.__version__}, median of {args.runs}")
    print(f"ftpeft spec_of + inject   {ftpeft_median * 1000:8.1f} ms")
    print(f"peft get_peft_model       {peft_median * 1000:8.1f} ms")
    print(f"ftpeft / peft: {ftpeft_median / peft_median:.3f}")
    print("no tensor data allocated: every planned leaf and every peft parameter is on the meta device")


if __name__ == "__main__":
    main()

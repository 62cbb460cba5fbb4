"""Peak resident memory of `ftpeft merge` on a sharded checkpoint, against the checkpoint's size.

Writes a bfloat16 checkpoint of about --size-gb GB in --shards shards (square
4096 x 4096 projection weights named like a Llama's) and a PEFT-layout LoRA
adapter (r = 16) on every q_proj and v_proj, then runs `ftpeft merge` in a
fresh process and reads its peak resident set size (VmHWM, reset after the
imports) minus its RSS right after the imports.

Usage: python benchmarks/merge_memory.py [--size-gb 1.0] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Every runner imports the shared /proc readers from this folder.
_PRELUDE = f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\nfrom _rss import reset_peak, status_kib\n"

RUNNER = _PRELUDE + """
import sys
import torch, ftpeft.cli, ftpeft.io

baseline = reset_peak()
code = ftpeft.cli.main(["merge", *sys.argv[1:]])
print(baseline, status_kib("VmHWM"), code, file=sys.stderr)
"""


def make_inputs(root: Path, size_gb: float, shards: int) -> tuple[int, int]:
    import torch

    from ftpeft.io import save_state

    side, rank = 4096, 16
    per_tensor = side * side * 2
    count = max(2 * shards, round(size_gb * 1e9 / per_tensor) // 2 * 2)
    layers = count // 2
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for layer in range(layers):
            for name in ("q_proj", "v_proj"):
                yield {f"model.layers.{layer}.self_attn.{name}.weight": torch.randn(side, side, generator=generator).to(torch.bfloat16)}

    shard_bytes = -(-count // shards) * per_tensor
    save_state(root / "base", tensors(), shard_size=shard_bytes)
    (root / "base" / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))

    adapter = {}
    for layer in range(layers):
        for name in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            adapter[f"{prefix}.lora_A.weight"] = torch.randn(rank, side, generator=generator) * 0.01
            adapter[f"{prefix}.lora_B.weight"] = torch.randn(side, rank, generator=generator) * 0.01
    from safetensors.torch import save_file

    (root / "adapter").mkdir()
    save_file(adapter, root / "adapter" / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapter.values())
    return count * per_tensor, adapter_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (10^9 bytes)")
    parser.add_argument("--shards", type=int, default=4, help="number of input shards")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        total, adapter_bytes = make_inputs(root, args.size_gb, args.shards)
        shard_size = max(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
        result = subprocess.run(
            [sys.executable, "-c", RUNNER, str(root / "base"), str(root / "adapter"), str(root / "out")],
            capture_output=True, text=True, check=True,
        )
        baseline, peak, code = result.stderr.strip().splitlines()[-1].split()
        print(f"checkpoint: {total / 1e9:.2f} GB bfloat16 in {args.shards} shards of {shard_size / 1e6:.0f} MB; adapter {adapter_bytes / 1e6:.0f} MB (float32)")
        print(f"ftpeft merge: exit {code}, peak RSS above baseline {(int(peak) - int(baseline)) / 1024:.0f} MiB")


if __name__ == "__main__":
    main()

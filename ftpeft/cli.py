"""The ``ftpeft`` command: demo, merge, inspect and convert."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch

__all__ = ["main"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class UserError(Exception):
    """A mistake in the command's input, reported as one line without a traceback."""


def main(argv: list[str] | None = None) -> int:
    """Run the ``ftpeft`` command and return its exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "demo":
        from .demo import main as demo_main

        return demo_main(args[1:])

    parser = _parser()
    options = parser.parse_args(args)
    if options.command is None:
        parser.print_help()
        return 2
    try:
        options.run(options)
    except BrokenPipeError:
        # The reader of our output (such as `head`) went away; that is not an error.
        sys.stderr.close()
        return 0
    except UserError as error:
        print(f"ftpeft {options.command}: error: {error}", file=sys.stderr)
        return 1
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, KeyError, TimeoutError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        # Library messages name the Python argument; on the command line the flag does the same job.
        message = message.replace("Pass key_map=replace_prefix(old, new)", "Pass --rename-prefix OLD=NEW")
        message = message.replace("Pass base= (the base tree or spec_of(model))", "Pass --base BASE_DIR (the base checkpoint)")
        print(f"ftpeft {options.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftpeft", description="Parameter-efficient fine-tuning as pure functions over parameter trees.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"ftpeft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("demo", help="fine-tune the bundled MiniLM sentence encoder with LoRA end to end (ftpeft demo --help)")

    merge = commands.add_parser(
        "merge",
        help="merge an adapter into a sharded Hugging Face checkpoint, shard by shard",
        description="Merge a PEFT or ftpeft adapter into a Hugging Face checkpoint directory and write the result "
        "as sharded safetensors with an index, holding about one shard in memory. Config and tokenizer files are copied.",
    )
    merge.add_argument("base", type=Path, metavar="BASE_DIR", help="checkpoint directory (config.json and safetensors)")
    merge.add_argument("adapter", type=Path, metavar="ADAPTER_DIR", help="PEFT (adapter_config.json) or ftpeft (ftpeft_config.json) adapter folder")
    merge.add_argument("out", type=Path, metavar="OUT_DIR", help="output directory; created if missing")
    merge.add_argument("--dtype", choices=sorted(_DTYPES), help="cast floating-point tensors of the output to this dtype")
    merge.add_argument("--shard-size", default=None, help="largest output shard, e.g. 2GB (default: the largest input shard)")
    merge.add_argument(
        "--rename-prefix",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rename a leading prefix of the adapter's module paths to match the base, e.g. model=language_model.model",
    )
    merge.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="split the merge across N separate jobs, each started with its own --worker; worker 0 writes the index "
        "once every worker is done. Leave --workers and --worker out under torchrun, which gives the world size and rank",
    )
    merge.add_argument("--worker", type=int, metavar="K", help="this worker's number, from 0 to N-1 (with --workers)")
    merge.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="with --workers: how long worker 0 waits for the other workers' shards (default: 3600)",
    )
    merge.set_defaults(run=_merge)

    inspect = commands.add_parser("inspect", help="list a checkpoint's or adapter's tensors, and an adapter's targets")
    inspect.add_argument("path", type=Path, metavar="PATH", help="a .safetensors file, checkpoint directory, or adapter folder")
    inspect.add_argument(
        "--base",
        type=Path,
        metavar="BASE_DIR",
        help="checkpoint directory of the base model; needed to read a PEFT adapter that targets parameters directly (target_parameters)",
    )
    inspect.set_defaults(run=_inspect)

    convert = commands.add_parser("convert", help="convert an adapter between ftpeft's and PEFT's folder layouts")
    convert.add_argument("source", type=Path, metavar="SOURCE_DIR", help="adapter folder, either layout")
    convert.add_argument("target", type=Path, metavar="TARGET_DIR", help="output folder")
    convert.add_argument("--to", choices=["peft", "ftpeft"], required=True, help="layout to write")
    convert.add_argument(
        "--base",
        type=Path,
        metavar="BASE_DIR",
        help="checkpoint directory of the base model; needed to read a PEFT adapter that targets parameters directly (target_parameters)",
    )
    convert.set_defaults(run=_convert)
    return parser


def _key_map(rules: list[str]):
    from .io import replace_prefix
    from .maps import compose

    maps = []
    for rule in rules:
        old, separator, new = rule.partition("=")
        if not separator or not old or not new:
            raise UserError(f"--rename-prefix {rule!r} is not of the form OLD=NEW, e.g. model=language_model.model.")
        maps.append(replace_prefix(old, new))
    return compose(*maps) if maps else None


def _read_adapter(directory: Path, base=None, key_map=None):
    from .io import is_ftpeft_adapter, load_adapter, load_hf_peft_adapter

    if not directory.is_dir():
        raise UserError(f"adapter folder {str(directory)!r} does not exist.")
    if is_ftpeft_adapter(directory):
        config, adapter = load_adapter(directory)
        if key_map is not None:
            adapter = key_map(adapter, passthrough=True)
        return config, adapter
    if (directory / "adapter_config.json").is_file():
        return load_hf_peft_adapter(directory, base=base, key_map=key_map)
    raise UserError(f"{str(directory)!r} contains neither adapter_config.json (PEFT) nor ftpeft_config.json (ftpeft).")


def _merge(options: argparse.Namespace) -> None:
    from .io import checkpoint_spec, iter_state, save_state
    from .io._merge import AdapterMerge
    from .methods import peft_method_from_config

    if not options.base.is_dir():
        raise UserError(f"base checkpoint directory {str(options.base)!r} does not exist.")
    if options.out.resolve() == options.base.resolve():
        raise UserError("OUT_DIR must differ from BASE_DIR, so that the base checkpoint is never overwritten.")
    # With several workers, shards of the other workers may already be there, so only an index means a finished checkpoint.
    parallel = options.workers is not None or options.worker is not None or int(os.environ.get("WORLD_SIZE", "1")) > 1
    existing = not parallel and options.out.is_dir() and any(options.out.glob("*.safetensors"))
    if existing or (options.out / "model.safetensors.index.json").exists():
        raise UserError(f"OUT_DIR {str(options.out)!r} already contains a checkpoint; choose a new or empty directory.")
    spec = checkpoint_spec(options.base)
    config, adapter = _read_adapter(options.adapter, base=spec, key_map=_key_map(options.rename_prefix))
    method = peft_method_from_config(config)
    merge_map = AdapterMerge(method, adapter)
    merge_map.plan(spec)  # binds every adapter leaf before anything is written
    _warn_tied_embeddings(options.base, method, spec)

    shard_size = options.shard_size or max(_input_shard_sizes(options.base), default=5 * 10**9)
    dtype = _DTYPES[options.dtype] if options.dtype else None
    if parallel:
        _merge_with_workers(options, merge_map, shard_size, dtype, len(adapter), len(spec))
        return
    stream = iter_state(options.base, merge_map, dtype=dtype, progress=True)
    index = save_state(options.out, stream, shard_size=shard_size)
    _finish_merge(options, index, f"merged {len(adapter)} adapter tensors into {len(spec)} base tensors")


# Names that transformers models give their input and output embedding modules.
_EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in", "lm_head", "embed_out", "shared")


def _warn_tied_embeddings(base: Path, method, spec) -> None:
    """Print a warning when the adapter changes an embedding of a checkpoint whose config ties the input and output embeddings."""
    config_path = base / "config.json"
    if not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    tied = config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings", False))
    if not tied:
        return
    members = list(getattr(method, "methods", [method]))
    changed = [target.weight_key for member in members if hasattr(member, "lora_targets") for target in member.lora_targets(spec)]
    embeddings = [key for key in changed if key.rpartition(".")[0].rpartition(".")[2] in _EMBEDDING_NAMES]
    if embeddings:
        print(
            f"warning: config.json sets tie_word_embeddings, so the merged {embeddings[0]!r} also becomes the other embedding "
            "when the model loads, though the adapter changed only one. To keep them apart, set tie_word_embeddings to "
            "false and add the base table under the other name.",
            file=sys.stderr,
        )


def _merge_with_workers(options: argparse.Namespace, merge_map, shard_size, dtype, adapter_count: int, base_count: int) -> None:
    """Merge this worker's share. Worker 0 also writes the index and copies the side files."""
    import torch.distributed as dist

    from .distributed import convert_checkpoint

    started = False
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_torchrun and (options.workers is not None or options.worker is not None):
        raise UserError("under torchrun, leave out --workers and --worker: the world size and rank number the workers.")
    if options.workers is None:
        if options.worker is not None:
            raise UserError("--worker needs --workers N.")
        # Started by torchrun, which sets WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT.
        dist.init_process_group("gloo")
        started = True
        count, index = dist.get_world_size(), dist.get_rank()
    else:
        count, index = options.workers, options.worker
        if count < 1:
            raise UserError(f"--workers {count} is invalid; give the number of workers, 1 or more.")
        if index is None or not 0 <= index < count:
            raise UserError(f"--workers {count} needs --worker K with 0 <= K < {count}, got {index}.")
    try:
        result = convert_checkpoint(
            options.base,
            options.out,
            merge_map,
            count=count,
            index=index,
            shard_size=shard_size,
            dtype=dtype,
            fingerprint=_adapter_fingerprint(merge_map),
            timeout=options.timeout,
            progress=index == 0,
        )
    finally:
        if started:
            dist.destroy_process_group()
    if result is None:
        print(f"worker {index} of {count}: wrote its shards to {options.out}")
        return
    _finish_merge(options, result, f"merged {adapter_count} adapter tensors into {base_count} base tensors with {count} workers")


def _finish_merge(options: argparse.Namespace, index: Path, summary: str) -> None:
    """Copy the side files next to the merged checkpoint and print what was written."""
    copied = _copy_side_files(options.base, options.out, options.dtype)
    shards = len(set(json.loads(index.read_text())["weight_map"].values()))
    print(summary)
    print(f"wrote {shards} shard(s) and {index.name} to {options.out}")
    if copied:
        print(f"copied {', '.join(copied)}")


def _adapter_fingerprint(merge_map) -> str:
    """Return a hash of the adapter's config and tensor bytes, so that workers given other adapters are caught."""
    import hashlib

    digest = hashlib.sha256(merge_map.method.config.model_dump_json().encode())
    for key in sorted(merge_map.adapter):
        tensor = merge_map.adapter[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _input_shard_sizes(base: Path) -> list[int]:
    return [path.stat().st_size for path in base.glob("*.safetensors")]


def _copy_side_files(base: Path, out: Path, dtype_name: str | None) -> list[str]:
    """Copy config, tokenizer and other non-weight files; record a new dtype in config.json."""
    copied = []
    for path in sorted(base.iterdir()):
        if not path.is_file() or path.suffix in (".safetensors", ".bin", ".pt", ".pth") or path.name.endswith(".index.json"):
            continue
        target = out / path.name
        if path.name == "config.json" and dtype_name:
            data = json.loads(path.read_text())
            for field in ("torch_dtype", "dtype"):
                if field in data or field == "torch_dtype":
                    data[field] = dtype_name
            target.write_text(json.dumps(data, indent=2) + "\n")
        else:
            shutil.copy2(path, target)
        copied.append(path.name)
    return copied


def _inspect(options: argparse.Namespace) -> None:
    path: Path = options.path
    if path.is_dir() and ((path / "adapter_config.json").is_file() or (path / "ftpeft_config.json").is_file()):
        _inspect_adapter(path, options.base)
        return
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist.")
    from .io import checkpoint_spec
    from .io._format import tensor_bytes

    spec = checkpoint_spec(path)
    width = max((len(key) for key in spec), default=3)
    print(f"{'key':{width}}  {'shape':>20}  {'dtype':>9}  {'size':>10}")
    for key, leaf in spec.items():
        print(f"{key:{width}}  {str(tuple(leaf.shape)):>20}  {str(leaf.dtype).removeprefix('torch.'):>9}  {_size(tensor_bytes(leaf)):>10}")
    values = sum(math.prod(leaf.shape) for leaf in spec.values())
    total = sum(tensor_bytes(leaf) for leaf in spec.values())
    print(f"{len(spec)} tensors, {values:,} values, {_size(total)}")


def _inspect_adapter(path: Path, base_dir: Path | None) -> None:
    from .io import checkpoint_spec
    from .methods import LoRAConfig

    config, adapter = _read_adapter(path, base=checkpoint_spec(base_dir) if base_dir is not None else None)
    lora = config if isinstance(config, LoRAConfig) else next((m for m in getattr(config, "methods", []) if isinstance(m, LoRAConfig)), None)
    layout = "ftpeft" if (path / "ftpeft_config.json").is_file() else "PEFT"
    print(f"{layout} adapter: {config.kind}, {len(adapter)} tensors")
    if lora is not None:
        names = {key.rsplit(".", 1)[0]: key.rsplit(".", 1)[1][:-2] for key in adapter if key.endswith((".lora_A", ".lora_embedding_A"))}
        modules = sorted(names)
        width = max((len(m) for m in modules), default=6)
        print(f"{'module':{width}}  {'rank':>4}  {'scale':>8}  {'lora_A':>12}  {'lora_B':>12}")
        for module in modules:
            prefix = f"{module}.{names[module]}"
            shape_a, shape_b = tuple(adapter[f"{prefix}_A"].shape), tuple(adapter[f"{prefix}_B"].shape)
            print(f"{module:{width}}  {lora.rank_of(module):>4}  {lora.scale_of(module):>8.4g}  {str(shape_a):>12}  {str(shape_b):>12}")
        print(
            f"LoRA on {len(modules)} modules, r={lora.params.r}, alpha={lora.params.alpha:g}, "
            f"rsLoRA={lora.params.use_rslora}, DoRA={lora.params.use_dora}, fan_in_fan_out={lora.params.fan_in_fan_out}"
        )
    lora_leaves = (".lora_A", ".lora_B", ".lora_bias", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")
    others = sorted(key for key in adapter if not key.endswith(lora_leaves))
    if others:
        print(f"fully trained tensors: {', '.join(others)}")


# Fields of a PEFT adapter_config.json that ftpeft's layout has no place for, kept beside it by convert.
PEFT_EXTRA_NAME = "peft_extra.json"


def _convert(options: argparse.Namespace) -> None:
    from .io import read_hf_peft_config, save_adapter, save_hf_peft_adapter
    from .methods import LoRAConfig

    if options.target.resolve() == options.source.resolve():
        raise UserError("TARGET_DIR must differ from SOURCE_DIR, so that the source adapter is never overwritten.")
    from .io import checkpoint_spec

    base = checkpoint_spec(options.base) if options.base is not None else None
    config, adapter = _read_adapter(options.source, base=base)
    from_peft = (options.source / "adapter_config.json").is_file()
    extra = read_hf_peft_config(options.source).extra if from_peft else None
    if options.to == "peft":
        kept = options.source / PEFT_EXTRA_NAME
        if extra is None and kept.is_file():
            extra = json.loads(kept.read_text())
        lora = config if isinstance(config, LoRAConfig) else next((m for m in config.methods if isinstance(m, LoRAConfig)), None)
        if lora is not None and lora.parameter_pattern is not None:
            raise UserError(
                "PEFT names the leaves of directly targeted parameters by the order of the parameters in their module, "
                "which a checkpoint does not record. Call ftpeft.io.save_hf_peft_adapter(..., base=spec_of(model)) from Python."
            )
        save_hf_peft_adapter(options.target, config, adapter, extra=extra)
    else:
        save_adapter(options.target, config, adapter)
        if extra:
            (options.target / PEFT_EXTRA_NAME).write_text(json.dumps(extra, indent=2, sort_keys=True) + "\n")
    print(f"wrote {options.to} adapter with {len(adapter)} tensors to {options.target}")


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB"


if __name__ == "__main__":
    sys.exit(main())

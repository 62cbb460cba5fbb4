"""Streamed, sharded checkpoint loading and saving through maps."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..maps import Plan, StateMap, identity
from ..maps._core import run_group
from ..tree import TensorSpec, Tree, combine
from ._format import CheckpointError, ShardWriter, TensorEntry, _is_dtensor, read_header, read_tensor, tensor_bytes, write_file

__all__ = ["CheckpointError", "atomic_write_file", "atomic_write_text", "checkpoint_spec", "iter_state", "load_state", "save_state"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def _temporary_beside(final: Path) -> Path:
    return final.with_name(f".ftpeft-{uuid.uuid4().hex[:12]}-{final.name}.tmp")


def atomic_write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file under a temporary name beside ``path``, then rename it to ``path``."""
    final = Path(path)
    reject_dtensors(tensors, final)
    temporary = _temporary_beside(final)
    try:
        write_file(temporary, tensors, metadata)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def reject_dtensors(tree: Mapping[str, Any], target: Path) -> None:
    """Raise ``TypeError`` naming the first DTensor of ``tree``, before anything is written to ``target``."""
    for key, value in tree.items():
        if _is_dtensor(value):
            raise TypeError(
                f"Cannot write {str(target)!r}: tensor {key!r} is a DTensor, which contains only this rank's part. "
                "Gather it first, with ftpeft.distributed.gather or ftpeft.distributed.save_gathered."
            )


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file under a temporary name beside ``path``, then rename it to ``path``."""
    final = Path(path)
    temporary = _temporary_beside(final)
    try:
        temporary.write_text(text)
        os.replace(temporary, final)
    finally:
        temporary.unlink(missing_ok=True)


def _checkpoint_entries(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Locate every tensor of a checkpoint: one file, or a directory with an index or one model.safetensors.

    Only files that the index names are opened, so stale shards beside them
    are never read.
    """
    path = Path(path)
    if path.is_file():
        return dict(read_header(path).entries)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint path {str(path)!r} does not exist; give a .safetensors file or a directory.")

    index_file = path / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{str(index_file)!r} is not a valid index ({error!r}); it needs a 'weight_map' object.") from None
        entries: dict[str, TensorEntry] = {}
        headers = {}
        for key, file_name in weight_map.items():
            file = path / file_name
            if file_name not in headers:
                if not file.is_file():
                    raise FileNotFoundError(f"{str(index_file)!r} maps {key!r} to {file_name!r}, which does not exist.")
                headers[file_name] = read_header(file)
            header = headers[file_name]
            if key not in header.entries:
                raise CheckpointError(f"{str(index_file)!r} maps {key!r} to {file_name!r}, but that file has no tensor {key!r}.")
            entries[key] = header.entries[key]
        return entries

    single = path / SINGLE_NAME
    if single.is_file():
        return dict(read_header(single).entries)
    raise FileNotFoundError(
        f"{str(path)!r} contains neither {INDEX_NAME} nor {SINGLE_NAME}; point at a checkpoint directory or a .safetensors file."
    )


def checkpoint_spec(path: str | os.PathLike) -> dict[str, TensorSpec]:
    """Return the spec of every tensor in a checkpoint, reading headers only."""
    return {key: entry.spec for key, entry in _checkpoint_entries(path).items()}


class StateStream:
    """An iterator of trees that states up front every key, shape and dtype it will yield, in order.

    ``save_state`` uses ``spec`` to write each shard's header first and
    then each tensor as it arrives, so nothing waits in memory for a shard
    to fill.
    """

    def __init__(self, spec: Mapping[str, TensorSpec], trees: Iterator[Tree]):
        self.spec = dict(spec)
        self._trees = trees

    def __iter__(self) -> Iterator[Tree]:
        return self

    def __next__(self) -> Tree:
        return next(self._trees)


def iter_state(
    path: str | os.PathLike,
    map: StateMap | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    passthrough: bool = False,
    progress: bool = False,
) -> StateStream:
    """Yield a checkpoint group by group, through a map, keeping one group in memory at a time.

    Each yielded tree contains one dependency group's outputs. The group's
    inputs are read from the files that hold them, converted, and dropped
    before the next group is read. The returned stream states its output
    spec up front, so piping it into ``save_state`` converts a
    checkpoint in memory bounded by the largest group.

    Args:
        path: a ``.safetensors`` file, or a directory with
            ``model.safetensors.index.json`` or ``model.safetensors``.
        map: applied to the checkpoint's keys; identity when None.
        device: where the yielded tensors live.
        dtype: cast floating-point outputs to this dtype.
        passthrough: pass keys the map does not read through unchanged.
        progress: show a progress bar over groups.
    """
    entries = _checkpoint_entries(path)
    plan = (map or identity).plan({key: entry.spec for key, entry in entries.items()}, passthrough=passthrough)
    spec = {}
    for key in plan.outputs:
        leaf = plan.output_spec[key]
        if dtype is not None and leaf.dtype.is_floating_point:
            leaf = dataclasses.replace(leaf, dtype=dtype)
        spec[key] = leaf
    return StateStream(spec, _run_plan(plan, entries, device=device, dtype=dtype, progress=progress))


def _run_plan(plan: Plan, entries: Mapping[str, TensorEntry], *, device, dtype, progress: bool) -> Iterator[Tree]:
    groups = plan.groups
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="groups", unit="group")
    with contextlib.ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for group in groups:
            if not group.outputs:
                continue
            inputs = {}
            for key in group.inputs:
                entry = entries[key]
                if entry.file not in handles:
                    handles[entry.file] = stack.enter_context(open(entry.file, "rb"))
                inputs[key] = read_tensor(entry, handles[entry.file])
            outputs = run_group(group, inputs)
            del inputs
            placed = {key: _place(value, device, dtype) for key, value in outputs.items()}
            del outputs
            yield placed
            # Drop this group before reading the next one.
            del placed


def _place(value: torch.Tensor, device, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and value.is_floating_point():
        value = value.to(dtype)
    return value.to(device)


def load_state(
    path: str | os.PathLike,
    map: StateMap | None = None,
    *,
    spec: Mapping[str, TensorSpec] | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    passthrough: bool = False,
    progress: bool = False,
) -> Tree:
    """Load a checkpoint, through a map, into one tree.

    Reads a ``.safetensors`` file or a sharded Hugging Face directory, group
    by group (see ``iter_state``). Only the files the index names, and
    only the ones the map's groups need, are opened.

    Args:
        spec: the spec the result must fit, for example
            ``method.inject(spec_of(meta_model))``. Every loaded key must be
            in it with the same shape and dtype (after ``dtype``). Every key
            of it must be loaded, except adapter leaves, which ``inject``
            fills afterwards.

    Raises:
        FileNotFoundError: naming a missing path or a shard the index names.
        CheckpointError: naming a truncated or corrupt file, or an index
            entry whose tensor is missing.
        ValueError: naming a key whose shape or dtype differs from ``spec``,
            or keys the spec lacks or the checkpoint lacks.
    """
    tree = combine(*iter_state(path, map, device=device, dtype=dtype, passthrough=passthrough, progress=progress))
    if spec is not None:
        _check_against(tree, spec, path)
    return tree


def _check_against(tree: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec], path) -> None:
    unexpected = [key for key in tree if key not in spec]
    if unexpected:
        raise ValueError(
            f"Checkpoint {str(path)!r} contains key(s) {', '.join(repr(k) for k in unexpected[:5])} that the spec does not "
            "have. Map the keys (for example StripPrefix('model')) or pass passthrough only for keys the model has."
        )
    for key, value in tree.items():
        want = spec[key]
        if tuple(value.shape) != want.shape or value.dtype != want.dtype:
            raise ValueError(
                f"Checkpoint {str(path)!r}: {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, but the spec "
                f"expects shape {want.shape} and dtype {want.dtype}."
            )
    missing = [key for key, want in spec.items() if key not in tree and not want.adapter]
    if missing:
        raise ValueError(
            f"Checkpoint {str(path)!r} has no value for key(s) {', '.join(repr(k) for k in missing[:5])}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''} that the spec expects."
        )


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"shard_size must be positive, got {size}.")
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = size.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)].strip()
            try:
                return _parse_size(int(float(number) * units[unit]))
            except ValueError:
                break
    raise ValueError(f"shard_size {size!r} is not a size; give bytes as an int or a string such as '2GB' or '500MiB'.")


def save_state(
    path: str | os.PathLike,
    tree_or_iterable: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
    map: StateMap | None = None,
    *,
    shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
    passthrough: bool = False,
    progress: bool = False,
) -> Path:
    """Write a tree, or a stream of trees, as sharded safetensors in a directory.

    Shards are named ``model-0000i-of-0000N.safetensors`` and listed in
    ``model.safetensors.index.json`` (``metadata.total_size`` is the sum of
    tensor bytes). A tensor larger than ``shard_size`` gets a shard of its
    own. Every file is first written under a temporary name in ``path`` and
    renamed at the end, the index last, so an error midway leaves no file
    under a final name. Files already in the directory that the new index
    does not name are left alone.

    Args:
        path: the output directory (created if needed).
        tree_or_iterable: one tree, or an iterable of trees such as
            ``iter_state`` yields.
        map: applied before writing (to each tree of an iterable).
        shard_size: the largest shard, in bytes or as a string such as ``"2GB"``.
        metadata: extra string metadata for every shard header, besides ``format: pt``.

    Returns:
        The path of the index json.
    """
    limit = _parse_size(shard_size)
    directory = Path(path)
    if directory.suffix == ".safetensors":
        raise ValueError(f"save_state writes a directory of shards; {str(directory)!r} looks like a file name. Drop the suffix.")
    if isinstance(tree_or_iterable, Mapping):
        reject_dtensors(tree_or_iterable, directory)
    directory.mkdir(parents=True, exist_ok=True)
    header_metadata = {"format": "pt", **(metadata or {})}

    token = uuid.uuid4().hex[:12]
    written: list[tuple[Path, list[str]]] = []
    weight_sizes: dict[str, int] = {}
    source = _as_stream(tree_or_iterable, map, passthrough=passthrough, progress=progress)
    try:
        if isinstance(source, StateStream):
            _write_streamed(source, directory, token, limit, header_metadata, written, weight_sizes)
        else:
            _write_buffered(source, directory, token, limit, header_metadata, written, weight_sizes)

        count = len(written)
        weight_map: dict[str, str] = {}
        finals: list[tuple[Path, Path]] = []
        for number, (temporary, keys) in enumerate(written, start=1):
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            finals.append((temporary, directory / name))
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": sum(weight_sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        index_temporary = directory / f".ftpeft-{token}-index.json.tmp"
        index_temporary.write_text(json.dumps(index, indent=2) + "\n")
    except BaseException:
        for temporary, _ in written:
            temporary.unlink(missing_ok=True)
        (directory / f".ftpeft-{token}-index.json.tmp").unlink(missing_ok=True)
        raise

    # NOTE: each rename is atomic, but the set of renames is not: a crash
    # between them can leave new shards under final names beside an old
    # index. The index is renamed last, so a reader never sees a new index
    # that names a missing shard.
    for temporary, final in finals:
        os.replace(temporary, final)
    index_path = directory / INDEX_NAME
    os.replace(index_temporary, index_path)
    return index_path


def _shard_path(directory: Path, token: str, number: int) -> Path:
    return directory / f".ftpeft-{token}-{number:05d}.safetensors.tmp"


def _write_streamed(stream: StateStream, directory: Path, token: str, limit: int, metadata, written, weight_sizes) -> None:
    """Write shards whose contents the stream's spec fixes in advance, each tensor as it arrives."""
    shards: list[dict[str, TensorSpec]] = []
    filled = 0
    for key, spec in stream.spec.items():
        size = tensor_bytes(spec)
        if not shards or (shards[-1] and filled + size > limit):
            shards.append({})
            filled = 0
        shards[-1][key] = spec
        filled += size
        weight_sizes[key] = size

    shard_index = 0
    writer: ShardWriter | None = None
    try:
        for tree in stream:
            for key, tensor in tree.items():
                while writer is None or writer.done:
                    if writer is not None:
                        writer.close()
                    if shard_index >= len(shards):
                        raise ValueError(f"save_state received {key!r}, which the stream's spec does not list.")
                    temporary = _shard_path(directory, token, shard_index)
                    written.append((temporary, list(shards[shard_index])))
                    writer = ShardWriter(temporary, shards[shard_index], metadata)
                    shard_index += 1
                writer.write(key, tensor)
            tree = tensor = None  # release this group before the next one is produced
        if writer is not None:
            writer.close()
            writer = None
        if shard_index != len(shards):
            raise ValueError(f"The stream ended before every planned tensor arrived; shard {shard_index + 1} of {len(shards)} is missing.")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise


def _write_buffered(trees, directory: Path, token: str, limit: int, metadata, written, weight_sizes) -> None:
    """Write trees whose keys are not known in advance, buffering up to one shard."""
    buffer: dict[str, torch.Tensor] = {}
    buffered = 0

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffer:
            return
        temporary = _shard_path(directory, token, len(written))
        written.append((temporary, list(buffer)))
        write_file(temporary, buffer, metadata)
        buffer, buffered = {}, 0

    for tree in trees:
        for key, tensor in tree.items():
            if key in weight_sizes:
                raise ValueError(f"save_state received key {key!r} twice; each key must be written once.")
            size = tensor_bytes(TensorSpec.of(tensor))
            if buffer and buffered + size > limit:
                flush()
            buffer[key] = tensor
            buffered += size
            weight_sizes[key] = size
        tree = tensor = None  # release this tree before the next one is produced
    flush()


def _as_stream(source, map: StateMap | None, *, passthrough: bool, progress: bool):
    """Return a StateStream when the keys are known in advance, else an iterator of trees."""
    if isinstance(source, StateStream) and map is None:
        return source
    if isinstance(source, Mapping):
        plan = (map or identity).plan(source, passthrough=passthrough)
        spec = {key: plan.output_spec[key] for key in plan.outputs}
        return StateStream(spec, _run_groups(plan, source, progress=progress))
    return _trees(source, map, passthrough=passthrough)


def _run_groups(plan: Plan, source: Mapping[str, torch.Tensor], *, progress: bool) -> Iterator[Tree]:
    groups = plan.groups
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="groups", unit="group")
    for group in groups:
        if group.outputs:
            yield run_group(group, {key: source[key] for key in group.inputs})


def _trees(source, map: StateMap | None, *, passthrough: bool) -> Iterator[Mapping[str, torch.Tensor]]:
    for tree in source:
        if not isinstance(tree, Mapping):
            raise TypeError(f"save_state expects a tree or an iterable of trees, but the iterable yielded {type(tree).__name__}.")
        yield tree if map is None else map(tree, passthrough=passthrough)
        del tree

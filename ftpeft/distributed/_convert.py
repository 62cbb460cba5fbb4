"""Converting one checkpoint with N workers, each reading, converting and writing 1/N of it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..io._format import ShardWriter, read_header, tensor_bytes
from ..io._state import (
    INDEX_NAME,
    StateStream,
    _as_stream,
    _checkpoint_entries,
    _parse_size,
    _run_plan,
    _temporary_beside,
    atomic_write_text,
    save_state,
)
from ..maps import Plan, Shard, StateMap, identity
from ..tree import TensorSpec

__all__ = ["convert_checkpoint", "save_gathered"]

_POLL_SECONDS = 0.2


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The output files of every worker: for worker ``w``, a list of ``(file name, {key: spec})``."""

    files: tuple[tuple[tuple[str, dict[str, TensorSpec]], ...], ...]

    @property
    def total(self) -> int:
        return sum(len(files) for files in self.files)

    def digest(self, fingerprint: str = "") -> str:
        """Return a hash of every file name, key, shape and dtype, and of ``fingerprint``, which all workers compute alike."""
        text = json.dumps(
            [[(name, [(key, list(spec.shape), str(spec.dtype)) for key, spec in specs.items()]) for name, specs in files] for files in self.files]
            + [fingerprint]
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _worker_plan(plan: Plan, count: int, index: int) -> Plan:
    # Shard deals the groups round robin; every worker deals the same plan, so the shares are disjoint.
    return Shard(identity, count, index)._own(plan)


def _pack(spec: Mapping[str, TensorSpec], limit: int) -> list[dict[str, TensorSpec]]:
    """Split keys into shards of at most ``limit`` bytes, in order, as ``save_state`` does."""
    shards: list[dict[str, TensorSpec]] = []
    filled = 0
    for key, leaf in spec.items():
        size = tensor_bytes(leaf)
        if not shards or (shards[-1] and filled + size > limit):
            shards.append({})
            filled = 0
        shards[-1][key] = leaf
        filled += size
    return shards


def _layout(plan: Plan, count: int, limit: int, dtype: torch.dtype | None) -> tuple[list[Plan], _Layout]:
    plans = [_worker_plan(plan, count, worker) for worker in range(count)]
    packed = []
    for worker_plan in plans:
        spec = {}
        for key in worker_plan.outputs:
            leaf = worker_plan.output_spec[key]
            if dtype is not None and leaf.dtype.is_floating_point:
                leaf = dataclasses.replace(leaf, dtype=dtype)
            spec[key] = leaf
        packed.append(_pack(spec, limit))
    total = sum(len(shards) for shards in packed)
    files = []
    number = 0
    for shards in packed:
        named = []
        for shard in shards:
            number += 1
            named.append((f"model-{number:05d}-of-{total:05d}.safetensors", shard))
        files.append(tuple(named))
    return plans, _Layout(tuple(files))


def _marker(directory: Path, count: int, worker: int) -> Path:
    return directory / f".ftpeft-worker-{worker:05d}-of-{count:05d}.done"


def convert_checkpoint(
    source: str | os.PathLike,
    target: str | os.PathLike,
    map: StateMap | None = None,
    *,
    count: int | None = None,
    index: int | None = None,
    shard_size: int | str = "5GB",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    passthrough: bool = False,
    fingerprint: str = "",
    timeout: float = 3600.0,
    progress: bool = False,
) -> Path | None:
    """Convert a checkpoint through a map with ``count`` workers; this call does worker ``index``'s share.

    Every worker plans ``map`` on the checkpoint's headers alike and deals
    its dependency groups round robin (``shard(map, count, index)``). Each
    worker reads only the files its groups need, converts them and writes
    its own shards. The shard names follow ``save_state``'s
    ``model-0000i-of-0000N.safetensors`` numbering over all workers, so
    the workers need not talk to agree on them. When every worker is done,
    worker 0 checks every shard's header and writes
    ``model.safetensors.index.json``. The tensors and the index keys equal
    those of ``save_state(target, iter_state(source, map))``, and with one
    worker the files are byte for byte the same.

    When a process group of ``count`` ranks is initialised, the workers
    compare their plans with ``all_gather_object``, which also waits for
    all of them. Worker 0 then sends the outcome of the index write to the
    others, so they all return or raise together. Without one (for example
    separate jobs on a shared file system) each worker leaves a marker file
    in ``target``, and worker 0 polls for all of them before it writes the
    index, then removes them.

    Args:
        source: a ``.safetensors`` file or a checkpoint directory.
        target: the output directory (created if needed).
        map: the conversion, for example
            ``AdapterMerge(method, adapter)`` to merge an adapter; identity
            when None.
        count: the number of workers; the process group's world size, or
            1, when None.
        index: this worker's number, from 0; the process group's rank, or
            0, when None.
        shard_size: the largest output shard, as for ``save_state``.
        dtype: cast floating-point outputs to this dtype.
        metadata: extra string metadata for every shard header.
        passthrough: pass keys the map does not read through unchanged.
        fingerprint: a string every worker must give alike, such as a hash
            of the adapter that ``map`` merges. The plans compare shapes
            only, so this is how workers with other values are caught.
        timeout: seconds worker 0 waits for the others' marker files when
            there is no process group.
        progress: show a progress bar over this worker's groups.

    Returns:
        The path of the index json on worker 0, None on the other workers.

    Raises:
        ValueError: if ``count`` or ``index`` is invalid, or, in a process
            group, if the workers planned different output shards.
        TimeoutError: on worker 0, naming the workers whose markers did not
            appear within ``timeout`` seconds.
        RuntimeError: on worker 0, naming a shard whose header does not list
            the planned tensors.
    """
    grouped = dist.is_available() and dist.is_initialized()
    if count is None:
        count = dist.get_world_size() if grouped else 1
    if index is None:
        index = dist.get_rank() if grouped else 0
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"convert_checkpoint needs count >= 1 and 0 <= index < count, got count={count}, index={index}.")
    collective = grouped and dist.get_world_size() == count
    if collective and index != dist.get_rank():
        raise ValueError(
            f"convert_checkpoint runs in a process group of {count} ranks, so index must be this process's rank "
            f"{dist.get_rank()}, got {index}. Leave index=None."
        )

    directory = Path(target)
    if directory.suffix == ".safetensors":
        raise ValueError(f"convert_checkpoint writes a directory of shards; {str(directory)!r} looks like a file name. Drop the suffix.")
    directory.mkdir(parents=True, exist_ok=True)

    entries = _checkpoint_entries(source)
    plan = (map or identity).plan({key: entry.spec for key, entry in entries.items()}, passthrough=passthrough)
    plans, layout = _layout(plan, count, _parse_size(shard_size), dtype)
    digest = layout.digest(fingerprint)

    _write_share(plans[index], layout.files[index], entries, directory, dtype, {"format": "pt", **(metadata or {})}, progress)
    atomic_write_text(_marker(directory, count, index), json.dumps({"layout": digest}) + "\n")

    if not collective:
        if index != 0:
            return None
        _wait_for_markers(directory, count, digest, timeout, progress)
        return _finish(directory, layout, count)

    # NOTE: a worker that fails before this point leaves the others waiting
    # here until the process group's timeout (30 minutes by default in torch 2.13).
    digests: list[str | None] = [None] * count
    dist.all_gather_object(digests, digest)
    differing = [worker for worker, other in enumerate(digests) if other != digests[0]]
    if differing:
        raise ValueError(
            f"Worker(s) {differing} planned other output shards, or gave another fingerprint, than worker 0. Start "
            "every worker with the same source, map (the same adapter), shard_size and dtype."
        )
    result, failure = None, [None]
    if index == 0:
        try:
            result = _finish(directory, layout, count)
        except Exception as error:  # noqa: BLE001 - sent to the other workers, then raised here too
            failure = [f"{type(error).__name__}: {error}"]
            raise
        finally:
            # The other workers return only once the index exists, or raise when it could not be written.
            dist.broadcast_object_list(failure, src=0)
    else:
        dist.broadcast_object_list(failure, src=0)
        if failure[0] is not None:
            raise RuntimeError(f"Worker 0 could not write the index: {failure[0]}")
    return result


def _finish(directory: Path, layout: _Layout, count: int) -> Path:
    """Write the index of every worker's shards, then remove the marker files."""
    index_path = _write_index(directory, layout)
    for worker in range(count):
        _marker(directory, count, worker).unlink(missing_ok=True)
    return index_path


def _write_share(plan: Plan, files, entries, directory: Path, dtype, metadata, progress: bool) -> None:
    """Run this worker's groups and write each of its shards under a temporary name, then rename it."""
    stream = _run_plan(plan, entries, device="cpu", dtype=dtype, progress=progress)
    pending = list(files)
    writer: ShardWriter | None = None
    temporary: Path | None = None
    final: Path | None = None
    try:
        for tree in stream:
            for key, tensor in tree.items():
                while writer is None or writer.done:
                    if writer is not None:
                        writer.close()
                        os.replace(temporary, final)
                    if not pending:
                        raise RuntimeError(f"The map produced {key!r}, which its plan does not list; this is a bug in the map.")
                    name, specs = pending.pop(0)
                    final = directory / name
                    temporary = _temporary_beside(final)
                    writer = ShardWriter(temporary, specs, metadata)
                writer.write(key, tensor)
            tree = tensor = None  # release this group before the next one is read
        if writer is not None:
            writer.close()
            os.replace(temporary, final)
            writer = None
        if pending:
            raise RuntimeError(f"The map stopped before shard {pending[0][0]!r} was written; this is a bug in the map.")
    except BaseException:
        if writer is not None:
            writer.abort()
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        raise


def _wait_for_markers(directory: Path, count: int, digest: str, timeout: float, progress: bool = False) -> None:
    deadline = time.monotonic() + timeout
    announced = False
    while True:
        markers = {worker: _marker_layout(_marker(directory, count, worker)) for worker in range(count)}
        waiting = [worker for worker, layout in markers.items() if layout != digest]
        if not waiting:
            return
        if progress and not announced:
            print(f"worker 0: waiting up to {timeout:g} s for worker(s) {waiting[:10]} of {count}", file=sys.stderr, flush=True)
            announced = True
        if time.monotonic() > deadline:
            # A marker of another plan may be stale, from an earlier run, so it is only reported at the end.
            differing = [worker for worker in waiting if markers[worker] is not None]
            detail = (
                f" Worker(s) {differing[:10]} left a marker of another plan or fingerprint: an earlier run, or a worker "
                "started with other arguments (another adapter, shard_size or dtype)."
                if differing
                else ""
            )
            raise TimeoutError(
                f"Worker(s) {waiting[:10]} of {count} did not finish within {timeout} s: {str(directory)!r} has no "
                f"matching marker file from them.{detail} Check that they run with the same source, map and "
                "shard_size, then rerun them."
            )
        time.sleep(_POLL_SECONDS)


def _marker_layout(path: Path) -> str | None:
    """Return the layout digest a worker's marker file records, or None while it has none."""
    try:
        return json.loads(path.read_text()).get("layout")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_index(directory: Path, layout: _Layout) -> Path:
    weight_map: dict[str, str] = {}
    total_size = 0
    for files in layout.files:
        for name, specs in files:
            header = read_header(directory / name)
            found = {key: entry.spec for key, entry in header.entries.items()}
            if found != specs:
                raise RuntimeError(
                    f"Shard {name!r} in {str(directory)!r} does not contain the planned tensors (first planned key "
                    f"{next(iter(specs))!r}). Another conversion may have written to this directory; rerun all workers."
                )
            weight_map.update({key: name for key in specs})
            total_size += sum(tensor_bytes(spec) for spec in specs.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = directory / INDEX_NAME
    atomic_write_text(index_path, json.dumps(index, indent=2) + "\n")
    return index_path


def save_gathered(
    path: str | os.PathLike,
    tree: Mapping[str, Any],
    map: StateMap | None = None,
    *,
    writer: int = 0,
    group: dist.ProcessGroup | None = None,
    shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
    passthrough: bool = False,
    progress: bool = False,
) -> Path | None:
    """Write a tree of DTensors as one checkpoint from rank ``writer``, one gathered group at a time.

    Every rank of ``group`` must call this with the same tree keys and map,
    because the map runs on every rank, group by group and in the same
    order: a ``gather`` in it is a collective. Rank ``writer`` streams each
    group's outputs into ``save_state`` and the other ranks drop them, so
    no rank keeps more than one group's full tensors. End ``map`` with
    ``gather(pattern=".*")``, and put a merge before it
    (``method.merge_map() >> Drop(...) >> gather(pattern=".*")``) so the
    merge runs shard-local.

    Returns:
        The path of the index json on rank ``writer``, None on the others.

    Raises:
        TypeError: naming a key whose output is still a DTensor, because the
            map does not gather it.
    """
    # NOTE: if the writer fails midway (a full disk), the other ranks wait in
    # their next gather until the process group's timeout.
    rank = dist.get_rank(group)
    stream = _as_stream(tree, map, passthrough=passthrough, progress=progress and rank == writer)
    checked = _gathered_only(stream)
    result = None
    try:
        if rank == writer:
            result = save_state(path, StateStream(stream.spec, checked), shard_size=shard_size, metadata=metadata)
        else:
            for _ in checked:
                pass
    finally:
        # The other ranks return only once the writer has renamed every file.
        dist.barrier(group)
    return result


def _gathered_only(trees):
    for tree in trees:
        for key, value in tree.items():
            if isinstance(value, DTensor):
                raise TypeError(
                    f"save_gathered got {key!r} as a DTensor; end the map with gather(pattern='.*') so every "
                    "output is a full tensor."
                )
        yield tree

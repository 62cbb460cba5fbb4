"""Reading and writing the safetensors format one tensor at a time.

A safetensors file is an 8-byte little-endian header length N, N bytes of
JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`` plus
an optional ``"__metadata__"`` of strings), then the raw little-endian bytes
of every tensor, offsets counted from the end of the header. Reading with
plain file reads instead of a memory map keeps the resident memory to the
tensors actually asked for.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..tree import TensorSpec

__all__ = ["DTYPES", "Header", "ShardWriter", "TensorEntry", "read_header", "read_tensor", "write_file", "tensor_bytes"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# Larger headers are almost certainly a corrupt length field.
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file or index is missing, truncated or malformed."""


@dataclass(frozen=True)
class TensorEntry:
    """The location of one tensor's bytes in a file."""

    file: Path
    spec: TensorSpec
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """The parsed header of one safetensors file."""

    file: Path
    entries: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(file: str | os.PathLike) -> Header:
    """Parse a safetensors header and check every offset against the file size.

    Raises:
        CheckpointError: naming the file when it is truncated or malformed.
        FileNotFoundError: naming the file when it does not exist.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"Checkpoint file {str(file)!r} does not exist.")
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{str(file)!r} is not a safetensors file: it is only {size} bytes long.")
        (length,) = struct.unpack("<Q", prefix)
        if length > _MAX_HEADER:
            raise CheckpointError(
                f"{str(file)!r} is not a safetensors file: its first 8 bytes do not give a plausible header length. "
                "Pass a .safetensors file or a checkpoint directory."
            )
        if 8 + length > size:
            raise CheckpointError(
                f"{str(file)!r} is truncated or corrupt: its header claims {length} bytes but the file has {size}."
            )
        try:
            raw = json.loads(handle.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{str(file)!r} has a corrupt safetensors header ({error}).") from None

    if not isinstance(raw, dict):
        raise CheckpointError(f"{str(file)!r} has a corrupt safetensors header (not a JSON object).")
    metadata = raw.pop("__metadata__", None) or {}
    data_start = 8 + length
    entries: dict[str, TensorEntry] = {}
    for name, info in raw.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(v) for v in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{str(file)!r} has a malformed header entry for tensor {name!r}: {info!r}.") from None
        expected = _numel(shape) * _itemsize(dtype)
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{str(file)!r}: tensor {name!r} of shape {shape} and dtype {info['dtype']} needs {expected} bytes, "
                f"but its offsets span {end - begin}."
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{str(file)!r} is truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size}."
            )
        entries[name] = TensorEntry(file, TensorSpec(shape, dtype), data_start + begin, data_start + end)
    return Header(file, entries, metadata)


def read_tensor(entry: TensorEntry, handle=None) -> torch.Tensor:
    """Read one tensor's bytes into a new CPU tensor."""
    tensor = torch.empty(entry.spec.shape, dtype=entry.spec.dtype)
    if entry.end == entry.begin:
        return tensor
    buffer = memoryview(tensor.view(-1).view(torch.uint8).numpy())
    close = handle is None
    handle = handle or open(entry.file, "rb")  # noqa: SIM115 - closed below when opened here
    try:
        handle.seek(entry.begin)
        read = handle.readinto(buffer)
    finally:
        if close:
            handle.close()
    if read != entry.end - entry.begin:
        raise CheckpointError(f"{str(entry.file)!r} is truncated: could not read all bytes of a tensor.")
    return tensor


def tensor_bytes(spec: TensorSpec) -> int:
    """Return how many bytes a tensor of this spec occupies on disk."""
    return _numel(spec.shape) * _itemsize(spec.dtype)


class ShardWriter:
    """Write one safetensors file whose tensors are known in advance, one tensor at a time.

    The header is written first from the specs, so each tensor can be written
    as soon as it exists and dropped right after. Tensors must arrive in the
    order of ``specs``. The header is padded with spaces to a multiple of 8
    bytes, as the safetensors library does, so every tensor starts aligned.
    """

    def __init__(self, file: str | os.PathLike, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None):
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        for name, spec in specs.items():
            if spec.dtype not in _NAMES:
                raise TypeError(f"Tensor {name!r} has dtype {spec.dtype}, which safetensors cannot store.")
            size = tensor_bytes(spec)
            header[name] = {"dtype": _NAMES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, offset + size]}
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)

        self.file = Path(file)
        self._pending = list(specs.items())
        self._handle = open(self.file, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; its name, shape and dtype must be the next of the specs."""
        if not self._pending:
            raise ValueError(f"{str(self.file)!r}: tensor {name!r} arrived after every planned tensor was written.")
        if _is_dtensor(tensor):
            raise TypeError(
                f"{str(self.file)!r}: tensor {name!r} is a DTensor, which contains only this rank's part. Gather it "
                "first, with ftpeft.distributed.gather or ftpeft.distributed.save_gathered."
            )
        expected_name, spec = self._pending[0]
        if name != expected_name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{str(self.file)!r}: expected {expected_name!r} {spec.shape} {spec.dtype} next, got {name!r} "
                f"{tuple(tensor.shape)} {tensor.dtype}. The stream yielded tensors other than it planned."
            )
        self._pending.pop(0)
        _write_tensor(self._handle, tensor)

    @property
    def done(self) -> bool:
        return not self._pending

    def close(self) -> None:
        """Flush and close the file; raise if a planned tensor was never written."""
        if self._pending:
            self.abort()
            raise ValueError(f"{str(self.file)!r}: {len(self._pending)} planned tensor(s) were never written, first {self._pending[0][0]!r}.")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def abort(self) -> None:
        """Close the file without checks, after an error; the caller removes it."""
        self._handle.close()


def write_file(file: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors to one safetensors file."""
    writer = ShardWriter(file, {name: TensorSpec.of(tensor) for name, tensor in tensors.items()}, metadata)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _write_tensor(handle, tensor: torch.Tensor) -> None:
    if tensor.numel() == 0:
        return
    data = tensor.detach().to("cpu").contiguous()
    handle.write(memoryview(data.view(-1).view(torch.uint8).numpy()))


def _is_dtensor(value: object) -> bool:
    # Only an imported torch.distributed.tensor can have made a DTensor, so plain users skip that import.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def _numel(shape: Iterable[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()

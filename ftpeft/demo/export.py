"""Write the demo's outputs atomically: the adapter, its config and the merged checkpoint.

Every file is written under a temporary name in the target directory and
moved into place with ``os.replace``, so a reader never sees a partial file
and an interrupted run leaves the previous file intact.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_FILE

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_FILE",
    "MERGED_FILE",
    "OutputError",
    "copy_file_atomically",
    "prepare_output_dir",
    "save_tensors_atomically",
    "write_atomically",
    "write_text_atomically",
]

ADAPTER_FILE = "adapter.safetensors"
# The name ftpeft.io.load_adapter and the ftpeft command look for, so the output works with `ftpeft merge`.
ADAPTER_CONFIG_FILE = "ftpeft_config.json"
MERGED_FILE = "model.safetensors"

# Files copied from the input checkpoint so that the output directory is a
# checkpoint too: `--checkpoint OUTPUT_DIR` and transformers' from_pretrained load it.
CHECKPOINT_SIDE_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


class OutputError(Exception):
    """An output directory that cannot be used; the message names it and what to do."""


def prepare_output_dir(output_dir: Path, checkpoint_dir: Path) -> Path:
    """Create ``output_dir`` if needed and return it, after checking it will not clobber a checkpoint.

    Raises:
        OutputError: if it is the input checkpoint's directory, contains a sharded
            checkpoint index that would shadow the merged file, or cannot be created.
    """
    if output_dir.exists() and output_dir.resolve() == checkpoint_dir.resolve():
        raise OutputError(
            f"--output-dir {output_dir} is the input checkpoint's directory, and the merged weights would "
            "overwrite its model.safetensors; choose another directory."
        )
    if (output_dir / INDEX_FILE).exists():
        raise OutputError(
            f"{output_dir} contains {INDEX_FILE}, which loaders would read instead of the merged {MERGED_FILE}; "
            "choose an empty directory."
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"Cannot create the output directory {output_dir} ({error.strerror}); choose another --output-dir.") from None
    return output_dir


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)`` on a fresh file next to ``path``, then move it onto ``path``.

    The temporary file is created with the usual permissions (0o666 less the
    umask), synced to disk before the move and removed if anything fails.

    Raises:
        OutputError: if the file cannot be written.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
    except OSError as error:
        raise OutputError(f"Cannot write to {path.parent} ({error.strerror}); choose another --output-dir.") from None
    try:
        write(temporary)
        # safetensors 0.8 leaves the file with mode 0o600, so restore the umask-based mode.
        os.chmod(temporary, mode)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputError(f"Cannot write {path} ({error.strerror or error}); check the free space and permissions of {path.parent}.") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def save_tensors_atomically(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Save ``tensors`` as a safetensors file at ``path``, atomically.

    The ``{"format": "pt"}`` metadata is what transformers expects of a
    PyTorch safetensors file.
    """
    contiguous = {key: tensor.detach().contiguous() for key, tensor in tensors.items()}
    write_atomically(path, lambda temporary: save_file(contiguous, str(temporary), metadata={"format": "pt"}))


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path``, atomically."""
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def copy_file_atomically(source: Path, path: Path) -> None:
    """Copy ``source`` to ``path``, atomically."""
    write_atomically(path, lambda temporary: shutil.copyfile(source, temporary))

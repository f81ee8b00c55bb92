"""Checkpoint files written atomically and read with an error that names a damaged file.

- Writes go to a temporary file in the target's folder, are flushed to disk, then renamed onto
  the target (``os.replace``, atomic on POSIX): a crash mid-save leaves the previous file (or
  none), never a truncated one.
- Reads check the file first: a file that is missing, empty, truncated or not a ``torch.save``
  archive raises :class:`~lightning_asyncpipe.errors.CheckpointError` naming the file, its size
  and what to do, instead of ``OSError: [Errno 22] Invalid argument`` from inside ``torch.load``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import Any, Callable, Optional

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_asyncpipe.errors import CheckpointError

__all__ = ["AtomicCheckpointIO", "check_readable"]

_WHAT_TO_DO = (
    "Resume from the previous checkpoint instead (with ModelCheckpoint(save_last=True), its last.ckpt; or a "
    "*.ckpt of an earlier step), or pass ckpt_path=None to start afresh."
)


def check_readable(path: _PATH) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete ``torch.save`` archive (a local file)."""
    path = str(path)
    if "://" in path:
        return  # remote storage: left to fsspec and torch
    if not os.path.isfile(path):
        raise CheckpointError(f"The checkpoint {path} does not exist. {_WHAT_TO_DO}")
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise CheckpointError(
            f"The checkpoint {path} ({size} bytes) is unreadable: it is truncated or not a file written by "
            f"torch.save ({err}). {_WHAT_TO_DO}"
        ) from err
    if damaged is not None:
        raise CheckpointError(f"The checkpoint {path} ({size} bytes) is corrupt: its entry {damaged!r} fails its "
                              f"checksum. {_WHAT_TO_DO}")  # fmt: skip


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic writes and checked reads (see the module docstring)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        target = str(path)
        if "://" in target:
            return super().save_checkpoint(checkpoint, path, storage_options)
        folder = os.path.dirname(os.path.abspath(target))
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "wb") as f:
                _save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise

    @override
    def load_checkpoint(self, path: _PATH, map_location: Optional[Callable] = lambda storage, loc: storage,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:  # fmt: skip
        check_readable(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def _save(checkpoint: dict[str, Any], f: Any) -> None:
    import torch

    torch.save(checkpoint, f)

"""Pieces every model's training loop shares: atomic checkpoints and optional progress bars."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile

import torch

__all__ = ["SilentBar", "environment", "progress_bar", "save_atomic"]


def save_atomic(state: dict, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place.

    A crash mid-write leaves the previous checkpoint intact: the rename is atomic on POSIX and
    Windows alike. Load the result with ``torch.load(path, weights_only=True)``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


class SilentBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, leave: bool = True):
    """A tqdm bar, or a silent stand-in when ``enabled`` is False.

    Raises:
        ImportError: a bar asked for without tqdm installed.
    """
    if not enabled:
        return SilentBar()
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise ImportError(
            "progress bars need tqdm: pip install deepkern[models] (or turn progress off)"
        ) from error
    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=leave)


def environment(device: str) -> dict:
    """What a result file records about the run: versions, threads and device."""
    return {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }

"""Pieces every model's training loop shares: atomic checkpoints and optional progress bars."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import tempfile

import torch
import torch.distributed as dist

__all__ = [
    "SilentBar",
    "batches_of",
    "data_parallel",
    "environment",
    "process_group",
    "progress_bar",
    "rank_and_world",
    "save_atomic",
    "save_on_first_rank",
    "settings_from_arguments",
    "warmup_cosine",
    "write_json",
]


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


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes; (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def process_group(settings):
    """Join, for the duration of a command, the process group that torchrun describes.

    With WORLD_SIZE > 1 in the environment and no group yet, the processes meet on gloo, or on
    nccl when ``settings.device`` is CUDA; then each process takes GPU LOCAL_RANK and
    ``settings.device`` becomes ``cuda:LOCAL_RANK``. The group is torn down on the way out.
    Otherwise nothing happens.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    if str(settings.device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        settings.device = f"cuda:{local}"
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def data_parallel(module: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """``module`` wrapped in DistributedDataParallel when ``world`` > 1, else itself."""
    if world <= 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def warmup_cosine(lr: float, warmup_fraction: float, step: int, total: int) -> float:
    """Linear warm-up over the first ``warmup_fraction`` of ``total`` steps, then cosine decay."""
    warmup = int(warmup_fraction * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def batches_of(indices: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``indices``; a last batch of one joins no step.

    Batch norm in training mode cannot normalise a single example on a 1x1 map, so a last batch
    of one is dropped (one example in an epoch, which comes back reshuffled in the next).
    """
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches.pop()
    return batches


def settings_from_arguments(args, defaults, quick, full):
    """The settings a reproduce command runs with.

    ``--quick`` or ``--full`` picks the base dataclass instance (``defaults`` otherwise); every
    option given on the command line then overrides the field of the same name (lists become
    tuples); ``--full`` moves to CUDA when there is a device and no ``--device`` was given.
    """
    base = quick if getattr(args, "quick", False) else defaults
    if getattr(args, "full", False):
        base = full
    updates = {}
    for field in dataclasses.fields(base):
        value = getattr(args, field.name, None)
        if value is not None and value is not False:
            updates[field.name] = tuple(value) if isinstance(value, list) else value
    if getattr(args, "full", False) and "device" not in updates and torch.cuda.is_available():
        updates["device"] = "cuda"
    return dataclasses.replace(base, **updates)


def save_on_first_rank(state: dict, path: str, rank: int, world: int) -> None:
    """Process 0 writes the checkpoint (atomically); with several processes all wait for it,
    so that none runs ahead of a checkpoint it might resume from."""
    if rank == 0:
        save_atomic(state, path)
    if world > 1:
        dist.barrier()


def write_json(path: str, report: dict, indent: int = 2) -> None:
    """Write a command's report as JSON, creating its folder, through a temporary file that is
    renamed into place (a reader never sees half a report)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    partial = path + ".partial"
    with open(partial, "w") as file:
        json.dump(report, file, indent=indent)
    os.replace(partial, path)

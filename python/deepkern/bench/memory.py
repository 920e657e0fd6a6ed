"""Memory accounting that sees every tensor, on CPU as well as on CUDA.

The resident size of a process says little about a training step: the allocator keeps freed
blocks, and other threads allocate too. Two counts answer the question instead:

- saved bytes: the most bytes that autograd held for backward at any moment of the step,
  counted through saved-tensor hooks (each storage once, released when autograd drops it).
  This is what activation memory means.
- peak bytes: the highest point of the running sum of allocations minus frees during the step,
  relative to its start. On CPU it comes from the profiler's allocation events, on CUDA from the
  caching allocator's peak counter.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass
class StepMemory:
    saved_bytes: int
    peak_bytes: int


class _SavedMeter:
    """Live bytes of the storages autograd holds, and their peak."""

    def __init__(self, exclude: set):
        self.exclude = exclude
        self.counts: dict = {}
        self.live = 0
        self.peak = 0

    def hold(self, t: torch.Tensor):
        if t.layout != torch.strided or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key in self.exclude:
            return t
        count, nbytes = self.counts.get(key, (0, storage.nbytes()))
        if count == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.counts[key] = (count + 1, nbytes)
        return _Held(t, key, self)

    def release(self, key):
        count, nbytes = self.counts[key]
        if count == 1:
            del self.counts[key]
            self.live -= nbytes
        else:
            self.counts[key] = (count - 1, nbytes)


class _Held:
    """What autograd keeps in place of a saved tensor; tells the meter when it is dropped."""

    __slots__ = ("tensor", "key", "meter")

    def __init__(self, tensor, key, meter):
        self.tensor, self.key, self.meter = tensor, key, meter

    def __del__(self):
        self.meter.release(self.key)


def _unpack(held):
    return held.tensor if isinstance(held, _Held) else held


@contextlib.contextmanager
def _quiet_native_stderr():
    """The profiler's native layer logs start and stop lines on file descriptor 2; hide them."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def measure_step(
    step: Callable[[], object],
    device: torch.device | str = "cpu",
    exclude: Iterable[torch.Tensor] = (),
) -> StepMemory:
    """Run ``step()`` once (forward and backward) and count its memory.

    Args:
        step: a callable that runs one training step, ``loss.backward()`` included.
        device: where the step runs; on CUDA the peak comes from the caching allocator.
        exclude: tensors whose storages are not activations (the parameters, usually); autograd
            saving them costs nothing.

    Returns:
        StepMemory with the peak bytes autograd held and the peak bytes allocated above the
        starting point.
    """
    device = torch.device(device)
    meter = _SavedMeter({(t.device, t.untyped_storage().data_ptr()) for t in exclude})
    with torch.autograd.graph.saved_tensors_hooks(meter.hold, _unpack):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            step()
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - start
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            with _quiet_native_stderr():
                with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
                    step()
            peak = _peak_from_allocations(prof)
    return StepMemory(saved_bytes=meter.peak, peak_bytes=int(peak))


def _peak_from_allocations(prof) -> int:
    """Highest running total of allocations minus frees, in time order, from the profiler."""
    from torch._C._profiler import _EventType

    deltas = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            deltas.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    deltas.sort(key=lambda pair: pair[0])
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak

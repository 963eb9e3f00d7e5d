"""Host <-> device copies that do not stall a CUDA stream.

A copy from ordinary (pageable) host memory to a GPU makes the host wait until the stream has
drained, and a copy back to the host (`.cpu()`, `.item()`) waits for every kernel queued before it.
In a per-step loop each such copy costs one host-device synchronisation. These helpers stage the
data in pinned host memory instead, so the copy is queued on the current stream like a kernel:
stream order makes every later kernel see the copied values, and PyTorch's pinned-memory cache
keeps a staging buffer alive until the copy that uses it has finished.

On the CPU (and any non-CUDA device) they are the plain `.to()` / `.cpu()`: same values, same tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`; a host tensor going to a CUDA device is copied from pinned memory without blocking."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def pinned(t: Tensor, device: torch.device) -> Tensor:
    """A pinned copy of the host tensor `t` when it is bound for a CUDA `device` (for `copy_(..., non_blocking=True)`),
    else `t`."""
    if torch.device(device).type == "cuda" and t.device.type == "cpu":
        return t.pin_memory()
    return t


def to_host_async(t: Tensor) -> Tensor:
    """`t` on the host; from a CUDA device without waiting, into pinned memory.

    The host may read the result only after the stream has caught up (`HostCopy.wait`, a stream
    synchronisation, or a later blocking read); copying it back to the device on the same stream is
    ordered after this copy, so that needs no wait.
    """
    if t.device.type != "cuda":
        return t.cpu()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


class HostCopy:
    """A device tensor on its way to the host: queued now, waited for (only that copy) when read."""

    def __init__(self, t: Tensor) -> None:
        self._value = to_host_async(t)
        self._ready = None
        if t.device.type == "cuda":
            self._ready = torch.cuda.Event()
            self._ready.record(torch.cuda.current_stream(t.device))

    def wait(self) -> Tensor:
        """The host tensor, once its copy has finished (work queued after the copy keeps running)."""
        if self._ready is not None:
            self._ready.synchronize()
        return self._value


__all__ = ["HostCopy", "pinned", "to_device", "to_host_async"]

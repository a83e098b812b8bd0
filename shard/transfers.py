"""Host-device copies of a step that do not stall the host or the device.

`PinnedUpload` sends a step's host arrays to the device through reused page-locked
buffers with non-blocking copies: the host returns at once instead of waiting for the
stream (a copy from pageable memory makes it wait for every kernel queued before).
`HostCopy` brings a step's results back the same way: the copies are queued behind the
step's kernels, the host does what it can meanwhile, and `wait` blocks only then.
On CPU both are plain tensor handovers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class _PinnedBuffer:
    """One growing page-locked buffer of one dtype, and the event of its last copy."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.tensor: torch.Tensor | None = None
        self.last_copy: torch.cuda.Event | None = None

    def upload(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        if self.last_copy is not None:
            # The previous step's copy may still be reading this memory (normally long done).
            self.last_copy.synchronize()
        size = array.size
        if self.tensor is None or self.tensor.numel() < size:
            capacity = max(size, 2 * (self.tensor.numel() if self.tensor is not None else 0), 1024)
            self.tensor = torch.empty(capacity, dtype=self.dtype, pin_memory=True)
        host = self.tensor[:size]
        host.numpy()[:] = array.reshape(-1)
        out = host.view(array.shape).to(device, non_blocking=True)
        self.last_copy = torch.cuda.Event()
        self.last_copy.record()
        return out


class PinnedUpload:
    """Host arrays to `device`: non-blocking through pinned buffers on CUDA, as-is on CPU.

    The returned tensor may be used by any kernel queued after it on the current stream.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[torch.dtype, _PinnedBuffer] = {}

    def __call__(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return tensor.to(self.device)
        buffer = self._buffers.setdefault(tensor.dtype, _PinnedBuffer(tensor.dtype))
        return buffer.upload(array, self.device)


def device_tensor(data: object, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list or array on `device`, without making the host wait for the stream.

    A copy from pageable memory first waits for every kernel queued on the stream (a step
    run ahead, say); this one goes through page-locked memory, non-blocking, and may be used
    by any kernel queued after it on the current stream.
    """
    host = torch.as_tensor(data, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """Device tensors copied to the host behind the kernels that produce them.

        copy = HostCopy(picked.next_ids, picked.logprobs)   # queued, returns at once
        ...                                                  # host work meanwhile
        next_ids, logprobs = copy.wait()                     # CPU tensors
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        self._event: torch.cuda.Event | None = None
        if not tensors or tensors[0].device.type != "cuda":
            self._host: Sequence[torch.Tensor] = [t.cpu() for t in tensors]
            return
        self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for host, tensor in zip(self._host, tensors):
            host.copy_(tensor, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def wait(self) -> list[torch.Tensor]:
        """The host tensors, once every copy has landed."""
        if self._event is not None:
            self._event.synchronize()
        return list(self._host)

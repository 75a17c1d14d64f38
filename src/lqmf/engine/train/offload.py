"""Activation offload: what autograd keeps for backward waits in pinned host memory.

With gradient checkpointing a decoder keeps one tensor per block for backward, the block's input
(micro-batch x sequence x hidden): 64 MB per block at 4 x 2048 tokens of a 7B model, 2 GB over
its 32 blocks. `ActivationOffload` is a saved-tensor hook: each large saved tensor is copied to
pinned host memory on a side stream as soon as it is saved, so the device copy is freed when the
forward pass lets go of it, and in backward each comes back on another side stream one tensor
ahead of its use, so the copies overlap the recomputation instead of waiting for it.

With kept layers (below) a block's saved tensors take the same way; then backward fetches tensors
ahead until `ahead_bytes` are on their way (one kept block's worth), so a kept block's tensors travel
while the checkpointed blocks after it are recomputed.

Host memory holds a micro-batch's worth (freed by `clear()` after its backward). Without CUDA the
hook keeps a host clone, which exercises the same bookkeeping; training uses it on CUDA only.

Kept layers: decoder blocks that keep what they save for backward instead of being recomputed.

With gradient checkpointing every block runs its forward twice: once in the forward pass, keeping only
its input, and again in backward. A kept block runs it once and keeps its saved tensors (attention's
inputs and output, the MLP's gate and up, the norms' inputs); with activation offload those go to pinned
host memory like the checkpointed blocks' inputs and come back ahead of the block's backward. So
a kept block costs device memory, or host-link bandwidth when offloaded, and saves its forward's
recomputation. `kept_layers` (config) asks for some; the planner
(core/memory_plan.py: kept_layers_for) says how many fit and counts them.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

from lqmf.engine.compat import checkpointed_layers, set_layer_checkpointing

MIN_OFFLOAD_BYTES = 1 << 20  # smaller tensors (norm statistics, masks) are not worth a copy


@dataclass(frozen=True)
class _Ticket:
    """What autograd holds instead of an offloaded tensor."""

    key: int


class ActivationOffload:
    """Use as `with offload: loss = forward(...)`, then `loss.backward()`, then `offload.clear()`."""

    def __init__(self, device: Any, min_bytes: int = MIN_OFFLOAD_BYTES, ahead_bytes: int = 0):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # tensors say cuda:N; "cuda" alone would never match
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.min_bytes = min_bytes
        self.ahead_bytes = ahead_bytes  # fetched ahead in backward: at least the next tensor, this much at most
        self.to_host = torch.cuda.Stream(self.device) if self.cuda else None
        self.to_device = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: dict[int, Any] = {}
        self.arriving: dict[int, tuple[Any, Any]] = {}  # key -> (device tensor, its copy's event)
        self.used: set[int] = set()  # keys unpacked already: not fetched ahead again
        self.keys = itertools.count()
        self.offloaded_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> ActivationOffload:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def clear(self) -> None:
        """Forget a finished backward's tensors (and let their host memory be reused)."""
        self.host.clear()
        self.arriving.clear()
        self.used.clear()

    def _worth(self, tensor) -> bool:
        import torch

        return (tensor.device == self.device and not isinstance(tensor, torch.nn.Parameter)
                and tensor.numel() * tensor.element_size() >= self.min_bytes)

    def _pack(self, tensor) -> Any:
        import torch

        if not self._worth(tensor):
            return tensor
        key = next(self.keys)
        if self.cuda:
            self.to_host.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.to_host):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(self.to_host)  # its memory is reused only after the copy
        else:
            host = tensor.detach().clone()
        self.host[key] = host
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return _Ticket(key)

    def _unpack(self, packed) -> Any:
        import torch

        if not isinstance(packed, _Ticket):
            return packed
        if packed.key not in self.arriving:
            self._fetch(packed.key)
        tensor, event = self.arriving.pop(packed.key)
        self.used.add(packed.key)
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            tensor.record_stream(current)
        self._fetch_ahead(packed.key - 1)  # backward unpacks in reverse order: the next ones needed
        return tensor

    def _fetch_ahead(self, key: int) -> None:
        """Start copying back key (the next one backward needs) unless it is on its way, and the keys before
        it while less than ahead_bytes of these keys are (a key above them left arriving does not count)."""
        arriving = sum(tensor.numel() * tensor.element_size() for at, (tensor, _) in self.arriving.items() if at <= key)
        while key in self.host and (arriving == 0 or arriving < self.ahead_bytes):
            if key not in self.arriving and key not in self.used:
                self._fetch(key)
                host = self.host[key]
                arriving += host.numel() * host.element_size()
            key -= 1

    def _fetch(self, key: int) -> None:
        import torch

        host = self.host[key]
        if not self.cuda:
            self.arriving[key] = (host.clone(), None)
            return
        self.to_device.wait_stream(self.to_host)
        with torch.cuda.stream(self.to_device):
            tensor = host.to(self.device, non_blocking=True)
            self.arriving[key] = (tensor, self.to_device.record_event())


# ----------------------------------------------------------------------------- kept layers


def kept_indices(layers: int, count: int) -> list[int]:
    """Which of layers blocks to keep: count of them spread evenly (each at or just before the middle of its
    share of the stack), so the last block, the first of backward, when nothing has come back ahead
    of it, is recomputed unless every block is kept."""
    count = max(0, min(count, layers))
    return [math.floor((j + 0.5) * layers / count - 0.5) for j in range(count)]


def keep_layers(model, count: int) -> list[int]:
    """Stop checkpointing count of model's decoder layers (`kept_indices`); returns their indices (none
    where the model has no layers transformers checkpoints one by one)."""
    layers = checkpointed_layers(model)
    chosen = kept_indices(len(layers), count)
    for index in chosen:
        set_layer_checkpointing(layers[index], False)
    return chosen

"""Data parallelism for the training loops: the arithmetic of DDP at the same global batch.

Under `torchrun` every process draws the same global batch (same seed, same generator),
encodes only its own contiguous slice, and gathers the features of all slices with
gradient (`torch.distributed.nn.functional.all_gather`). Every process then computes the
same loss on the whole global batch, so contrastive losses, NCU's optimal-transport plan and
per-batch rules see exactly what one process would see. After `backward`, gradients are
averaged over processes (what `DistributedDataParallel` does); the gather's backward sums
the W identical losses' gradients into each slice, so the average is the one-process
gradient. Batch norm layers use statistics of the whole global batch (`GlobalBatchNorm2d`),
as `torch.nn.SyncBatchNorm` does on GPUs (which does not run on the CPU).

`DistributedDataParallel` itself is not used: its reducer expects one `forward` per
`backward`, while the methods here encode images, texts and (NCU) prompted texts in
separate calls.

Outside `torchrun` (one process) every function here is the identity or a no-op.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """True inside a `torchrun` worker with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the `torchrun` process group (gloo on CPU, nccl on CUDA); returns this process's device."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _slices(n: int, size: int) -> list[tuple[int, int]]:
    bounds = [round(i * n / size) for i in range(size + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def shard_map(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) computed as fn(own slice of x) on each process, then gathered (with gradient).

    `fn` must act row by row (an encoder: row i of the output depends on row i of x only,
    batch norm aside, see `GlobalBatchNorm2d`). Slices may differ in size by one row.
    """
    rank, size = world()
    if size == 1:
        return fn(x)
    from torch.distributed.nn.functional import all_gather

    parts = _slices(len(x), size)
    lo, hi = parts[rank]
    local = fn(x[lo:hi])
    longest = max(b - a for a, b in parts)
    if len(local) < longest:  # all_gather needs equal shapes: pad, then drop the padding
        local = F.pad(local, (0, 0) * (local.ndim - 1) + (0, longest - len(local)))
    with warnings.catch_warnings():  # deprecated for a private successor; still the public API
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather(local)
    return torch.cat([g[: b - a] for g, (a, b) in zip(gathered, parts, strict=True)])


def average_gradients(params: Iterable[torch.Tensor]) -> None:
    """All-reduce and average the gradients of `params` over the processes (DDP's step)."""
    rank, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective, as DDP's buckets
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch across processes.

    Same parameters and buffers (and state_dict) as `nn.BatchNorm2d`; identical to it in
    one process and in eval mode.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, size = world()
        if size == 1 or not self.training or not self.track_running_stats:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = (0, 2, 3)
        count = x.new_tensor([x.numel() / x.shape[1]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked += 1
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp(min=1), alpha=m)
        shape = (1, c, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def global_batchnorm(model: nn.Module) -> nn.Module:
    """Turn every BatchNorm2d of `model` into a GlobalBatchNorm2d in place (same tensors)."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model

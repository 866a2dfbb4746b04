"""torchrun support shared by `train`, `eval` and `segment`: one process group, sharded inputs.

Under ``torchrun --nproc-per-node N -m twins_timm COMMAND ...`` every process reads WORLD_SIZE /
RANK / LOCAL_RANK from the environment; :func:`init` joins the group (NCCL on CUDA, gloo on CPU).
Inputs are sharded round-robin (``items[rank::world]``); counts are summed with an all-reduce of
int64 tensors, so metrics are exactly the one-process figures.  Without torchrun everything here
is a no-op for a world of one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, TypeVar

T = TypeVar('T')


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> bool:
    """True inside a torchrun launch with more than one process."""
    return int(os.environ.get('WORLD_SIZE', '1')) > 1


def init(device_type: str = 'cpu', quiet_others: bool = False) -> Dist:
    """Join (or reuse) the process group of a torchrun launch; a world of one otherwise.

    ``quiet_others`` sends the standard output of every process but rank 0 to /dev/null (errors
    still reach stderr), so a command prints its report once.
    """
    ctx = _join(device_type)
    if quiet_others and not ctx.main:
        import sys
        sys.stdout = open(os.devnull, 'w')
    return ctx


def _join(device_type: str) -> Dist:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0')))
    if not launched():
        return Dist()
    if not dist.is_available():
        raise RuntimeError('this PyTorch build has no torch.distributed; run one process')
    backend = 'nccl' if device_type == 'cuda' else 'gloo'
    if device_type == 'cuda':
        import torch
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', '0')))
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0')))


def device_for(ctx: Dist, device):
    """A launch with N processes on CUDA gives process k the GPU cuda:LOCAL_RANK."""
    import torch
    device = torch.device(device)
    if ctx.active and device.type == 'cuda' and device.index is None:
        return torch.device('cuda', ctx.local_rank)
    return device


def shard(items: Sequence[T], ctx: Dist) -> List[T]:
    """This process's share of ``items``: every world-th item, starting at the rank."""
    return list(items[ctx.rank::ctx.world])


def all_sum(arrays: Sequence[Any], ctx: Dist) -> List[Any]:
    """Exact element-wise sums of integer numpy arrays over the processes."""
    if not ctx.active:
        return list(arrays)
    import numpy as np
    import torch
    import torch.distributed as dist
    flat = torch.from_numpy(np.concatenate([np.asarray(a, np.int64).reshape(-1) for a in arrays]))
    if dist.get_backend() == 'nccl':
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu().numpy()
    out, start = [], 0
    for a in arrays:
        n = np.asarray(a).size
        out.append(flat[start:start + n].reshape(np.asarray(a).shape))
        start += n
    return out


def gather(items: List[T], ctx: Dist) -> List[T]:
    """Concatenation of every process's list (in rank order), on every process."""
    if not ctx.active:
        return list(items)
    import torch.distributed as dist
    parts: List[Optional[List[T]]] = [None] * ctx.world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in (part or [])]


def barrier(ctx: Dist) -> None:
    if ctx.active:
        import torch.distributed as dist
        dist.barrier()


def finish(ctx: Dist) -> None:
    """Leave the process group (at the end of a command)."""
    if ctx.active:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

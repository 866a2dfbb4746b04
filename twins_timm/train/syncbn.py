"""SyncBatchNorm that also synchronises on CPU (gloo), for torchrun runs without GPUs.

torch's ``nn.SyncBatchNorm`` only synchronises CUDA / XPU tensors (and DDP refuses it on CPU).
On CUDA the runs use torch's; on CPU :class:`CPUSyncBatchNorm` computes the batch mean and
variance over every process with autograd-aware all-reduces (two passes: mean, then centred
squares), which is what makes N processes x B images train like one process with N*B.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, op=dist.ReduceOp.SUM)


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span every process of the group (see module docstring).

    Not an ``nn.SyncBatchNorm`` subclass: DistributedDataParallel refuses those on CPU.
    """

    process_group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError('expected at least 2D input (got %dD input)' % x.dim())

    def _sync(self, x: torch.Tensor) -> bool:
        return (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size(self.process_group or dist.group.WORLD) > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._sync(x):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.ndim))
        count = _all_sum(x.new_tensor([x.numel() / x.shape[1]]))
        mean = _all_sum(x.sum(dims)) / count
        shape = [1, -1] + [1] * (x.ndim - 2)
        centred = x - mean.view(shape)
        var = _all_sum((centred * centred).sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / self.num_batches_tracked.item() if self.momentum is None
                            else self.momentum)
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean)
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class CPUSyncBatchNormAct(CPUSyncBatchNorm):
    """timm's ``SyncBatchNormAct`` (BN + drop + act of the decoders' ``ConvNormAct``) on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def convert_sync_batchnorm(model: nn.Module, device_type: str = 'cuda') -> nn.Module:
    """timm's conversion (BN and timm's BN + act layers; same state dict keys); on CPU with this
    module's CPUSyncBatchNorm(Act)."""
    from timm.layers import convert_sync_batchnorm as timm_convert
    from timm.layers.norm_act import SyncBatchNormAct
    model = timm_convert(model)
    if device_type == 'cpu':
        for m in model.modules():
            if type(m) is SyncBatchNormAct:
                m.__class__ = CPUSyncBatchNormAct
            elif type(m) is nn.SyncBatchNorm:
                m.__class__ = CPUSyncBatchNorm
    return model

"""Building blocks shared by the decoders, named so that mmseg checkpoints load by prefix rename.

mmcv's `ConvModule` stores its parts as `.conv` / `.bn`, as does timm's `ConvNormAct`, and mmseg
heads classify with `.conv_seg`; keeping those names lets `decoder.<X>` take `decode_head.<X>`
unchanged. Every layer is a library module called as a module (hooks, PEFT, swaps work); for
deployment `fold_batchnorm` folds each eval BatchNorm into its conv once, with torch's fuse helper.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, ConvNormAct
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=False`, as every mmseg Twins head does."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


def adaptive_pool_matrix(n: int, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, n): `adaptive_avg_pool` along one axis as a matrix (bin i averages [i*n//bins, ceil((i+1)*n/bins))).

    Built from `n` by arithmetic, so it stays right for every size of an exported graph, where ONNX
    would fix `adaptive_avg_pool2d`'s kernel at the size seen while exporting.
    """
    i = torch.arange(bins, device=like.device)[:, None]
    r = torch.arange(n, device=like.device)[None, :]
    start, end = i * n // bins, ((i + 1) * n + bins - 1) // bins
    inside = ((r >= start) & (r < end)).to(like.dtype)
    return inside / (end - start).to(like.dtype)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, bins)` as two matmuls (the export path of the pyramid pooling)."""
    if bins == 1:  # a plain mean (the exporter cannot prove a 1-row product's reshapes for free sizes)
        return x.mean((-2, -1), keepdim=True)
    rows = adaptive_pool_matrix(x.shape[-2], bins, x)
    cols = adaptive_pool_matrix(x.shape[-1], bins, x)
    return rows @ x @ cols.T


def resize_matrix(n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(size, n): `resize` from n to size along one axis as a matrix (`resize`'s own weights).

    Built by resizing an identity, so it is exactly what `resize` computes, for any n and size.
    """
    eye = torch.eye(n, dtype=like.dtype, device=like.device)[None, None]
    return resize(eye, (size, n))[0, 0]


def conv_norm_act(in_channels: int, out_channels: int, kernel_size: int,
                  norm: bool = True, act: bool = True) -> ConvNormAct:
    """timm's `ConvNormAct`: conv -> BatchNorm + ReLU (mmcv `ConvModule` keys), or a plain biased conv.

    With `norm=True` the conv has no bias (BN supplies it); the FPN neck uses `norm=False,
    act=False`, i.e. a conv with bias and nothing else. The conv is a plain `nn.Conv2d`.
    """
    return ConvNormAct(in_channels, out_channels, kernel_size, bias=not norm, apply_norm=norm, apply_act=act)


def upsample2x() -> nn.Upsample:
    """Bilinear x2 (`align_corners=False`, the same weights as `resize` to twice the size)."""
    return nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval BatchNorm of a `ConvNormAct` into its conv (torch's `fuse_conv_bn_eval`), in place.

    A deployment step for inference: the BN's affine map becomes the conv's weight and bias, and the
    `.bn` slot keeps only its activation. The state dict changes (no `.bn.*` keys), so save the model
    before folding, not after. Raises if the model is in training mode.
    """
    if model.training:
        raise ValueError('fold_batchnorm folds eval-mode statistics; call model.eval() first')
    for m in model.modules():
        if isinstance(m, ConvNormAct) and isinstance(m.bn, BatchNormAct2d) and type(m.conv) is nn.Conv2d:
            m.conv = fuse_conv_bn_eval(m.conv, m.bn)
            m.bn = nn.Sequential(OrderedDict(drop=m.bn.drop, act=m.bn.act))
    return model


class SegHead(nn.Module):
    """Dropout2d then a 1x1 classifier (`conv_seg`), mmseg's `cls_seg`."""

    def __init__(self, in_channels: int, classes: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(in_channels, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's auxiliary FCNHead as the Twins configs use it: one 3x3 conv-BN-ReLU, no concat."""

    def __init__(self, in_channels: int, classes: int, channels: int = 256,
                 num_convs: int = 1, dropout: float = 0.1):
        super().__init__()
        self.convs = nn.Sequential(*[
            conv_norm_act(in_channels if i == 0 else channels, channels, 3)
            for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))

"""Building blocks shared by the decoders, named so that mmseg checkpoints load by prefix rename.

mmcv's `ConvModule` stores its parts as `.conv` / `.bn`, and mmseg heads classify with
`.conv_seg`; keeping those names lets `decoder.<X>` take `decode_head.<X>` unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=False`, as every mmseg Twins head does."""
    return F.interpolate(x, size=tuple(size), mode='bilinear', align_corners=False)


class ConvNormAct(nn.Module):
    """Conv -> BatchNorm -> ReLU, or a plain biased conv (mmcv `ConvModule` layout).

    With `norm=True` the conv has no bias (BN supplies it); the FPN neck uses `norm=False,
    act=False`, i.e. a conv with bias and nothing else.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
                 norm: bool = True, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size,
                              padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


class Upsample2x(nn.Module):
    """Bilinear x2 (`align_corners=False`); parameter-free slot in FPNHead's scale heads."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, (2 * x.shape[-2], 2 * x.shape[-1]))


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
            ConvNormAct(in_channels if i == 0 else channels, channels, 3)
            for i in range(num_convs)])
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))

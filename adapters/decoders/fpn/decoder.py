"""Semantic FPN decoder with mmseg's numerics: the FPN neck plus FPNHead.

SMP's `FPN` is a Panoptic-FPN variant (GroupNorm, no 3x3 output convs, `align_corners=True`),
so both parts are written here, with mmseg's layer names: `neck.lateral_convs` /
`neck.fpn_convs` (biased convs, no norm) and `scale_heads.k.j` (timm `ConvNormAct` conv-BN-ReLU with
`nn.Upsample` at mmseg's Sequential indices).
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from twins_timm.adapters.modules import conv_norm_act, resize, upsample2x


class FPNNeck(nn.Module):
    """1x1 laterals, nearest top-down addition, 3x3 output convs; all biased, no norm/act."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.lateral_convs = nn.ModuleList(
            conv_norm_act(c, out_channels, 1, norm=False, act=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            conv_norm_act(out_channels, out_channels, 3, norm=False, act=False)
            for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        levels = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(levels) - 1, 0, -1):
            levels[i - 1] = levels[i - 1] + F.interpolate(levels[i], size=levels[i - 1].shape[-2:], mode='nearest')
        return [conv(level) for conv, level in zip(self.fpn_convs, levels)]


def _scale_head(in_channels: int, channels: int, stride: int, base_stride: int) -> nn.Sequential:
    """max(1, log2(stride / base)) conv-BN-ReLU blocks, each followed by x2 unless stride==base."""
    steps = max(1, int(math.log2(stride) - math.log2(base_stride)))
    layers: List[nn.Module] = []
    for k in range(steps):
        layers.append(conv_norm_act(in_channels if k == 0 else channels, channels, 3))
        if stride != base_stride:
            layers.append(upsample2x())
    return nn.Sequential(*layers)


class FPNDecoder(nn.Module):
    """FPN neck then FPNHead's scale heads, summed at the stride-4 size.

    Input: four NCHW maps (strides 4, 8, 16, 32). Output: `channels` maps at the first map's size.
    """

    def __init__(self, encoder_channels: Sequence[int], pyramid_channels: int = 256,
                 channels: int = 128, strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        if len(strides) != len(encoder_channels):
            raise ValueError(f'FPNDecoder needs one stride per feature map, got strides {strides} '
                             f'for {len(encoder_channels)} maps')
        self.neck = FPNNeck(encoder_channels, pyramid_channels)
        self.scale_heads = nn.ModuleList(
            _scale_head(pyramid_channels, channels, s, strides[0]) for s in strides)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pyramid = self.neck(list(features)[-len(self.scale_heads):])
        out = self.scale_heads[0](pyramid[0])
        for head, level in zip(self.scale_heads[1:], pyramid[1:]):
            out = out + resize(head(level), out.shape[-2:])
        return out

"""UPerNet decoder with mmseg's UPerHead numerics.

SMP's `UPerNetDecoder` computes the same pyramid pooling + FPN fusion, but adds a LayerNorm on
every input feature and names its layers differently; this one has no extra norms and uses
mmseg's layer names (`psp_modules`, `bottleneck`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`), so `decode_head.*` weights load unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from twins_timm.adapters.modules import adaptive_avg_pool, conv_norm_act, resize


class UPerNetDecoder(nn.Module):
    """Pyramid pooling on the last map, top-down FPN over all four, 3x3 fusion at stride 4.

    Input: four NCHW maps (strides 4, 8, 16, 32). Output: `channels` maps at the first map's size.
    """

    def __init__(self, encoder_channels: Sequence[int], channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6)):
        super().__init__()
        *lateral_in, top_in = encoder_channels
        self.pool_scales = tuple(pool_scales)
        self.psp_modules = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_act(top_in, channels, 1))
            for scale in self.pool_scales)
        self.bottleneck = conv_norm_act(top_in + len(self.pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_norm_act(c, channels, 1) for c in lateral_in)
        self.fpn_convs = nn.ModuleList(conv_norm_act(channels, channels, 3) for _ in lateral_in)
        self.fpn_bottleneck = conv_norm_act(len(encoder_channels) * channels, channels, 3)

    def pyramid_pooling(self, top: torch.Tensor) -> torch.Tensor:
        size = top.shape[-2:]
        if torch.compiler.is_exporting():  # pooling bins computed from the symbolic size (ONNX-safe)
            pooled = [resize(conv(adaptive_avg_pool(top, scale)), size)
                      for scale, (_, conv) in zip(self.pool_scales, self.psp_modules)]
        else:
            pooled = [resize(branch(top), size) for branch in self.psp_modules]
        return self.bottleneck(torch.cat([top, *pooled], dim=1))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        features = list(features)[-4:]
        levels = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        levels.append(self.pyramid_pooling(features[-1]))
        for i in range(len(levels) - 1, 0, -1):  # top-down, cumulative
            levels[i - 1] = levels[i - 1] + resize(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels)] + [levels[-1]]
        return self.fuse(outs)

    def fuse(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fpn_bottleneck` over the concatenated levels, each resized to the finest."""
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resize(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

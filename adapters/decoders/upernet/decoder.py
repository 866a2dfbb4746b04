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

from timm.layers import ConvNormAct

from twins_timm.adapters.modules import (
    PLAIN_CONVS, adaptive_avg_pool, conv_norm_act, fast_inference, resize, upsampled_conv3x3)
from twins_timm.models import kernels


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
        size = outs[0].shape[-2:]
        if self._fuse_bottleneck(outs[0]):
            return self.fused_bottleneck(outs)
        outs = [outs[0]] + [resize(o, size) for o in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))

    def _fuse_bottleneck(self, x: torch.Tensor) -> bool:
        """CPU inference with the library's own, unhooked `fpn_bottleneck` (hooks see the full concat)."""
        block = self.fpn_bottleneck
        return (fast_inference(x) and type(block) is ConvNormAct and type(block.conv) in PLAIN_CONVS
                and not kernels.has_hooks(block))

    def fused_bottleneck(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fpn_bottleneck(cat([outs[0], *resized outs[1:]]))` without resizing or concatenating.

        The 3x3 conv over the concatenation is a sum of convs over its parts; each coarse part runs
        through `upsampled_conv3x3`. Half of UPerHead's FLOPs at mmseg's sizes go away.
        """
        conv = self.fpn_bottleneck.conv
        parts = conv.weight.split([o.shape[1] for o in outs], dim=1)
        x = kernels.conv3x3(outs[0], parts[0], conv.bias)
        for out, weight in zip(outs[1:], parts[1:]):
            upsampled_conv3x3(out, weight, x.shape[-2:], add_to=x)
        return self.fpn_bottleneck.bn(x)  # BN + ReLU (or only ReLU once folded), called as a module

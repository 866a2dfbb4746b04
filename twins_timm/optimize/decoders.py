"""The decoder path ``optimize`` swaps in: UPerHead's fusion conv per pyramid level, a subclass of the plain
(mmseg-numerics) decoder, taken only in eager CPU inference (``guards.fast_inference``)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from torch import nn

from twins_timm.adapters.decoders.upernet.decoder import UPerNetDecoder
from twins_timm.adapters.modules import resize_matrix
from twins_timm.optimize import guards

__all__ = ['FastUPerNetDecoder', 'upsampled_conv3x3', 'shifted_resize_matrices']


def shifted_resize_matrices(n: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(3, size, n): `resize` from n to size along one axis as a matrix, then moved by -1, 0, +1 rows.

    Row r of matrix k is output position r + k - 1 (zero outside), i.e. what tap k of a padded 3x3
    conv reads along that axis. Built by resizing an identity, so it is `resize`'s own weights.
    """
    rows = F.pad(resize_matrix(n, size, like), (0, 0, 1, 1))
    return torch.stack([rows[k:k + size] for k in range(3)])


# Output channels of `upsampled_conv3x3` go in chunks whose nine tap maps hold about this many elements
# (16 MiB in fp32): the temporaries stay near cache size and are re-used from chunk to chunk instead of being
# fresh 75 MB buffers (UPerHead at 512x512). Measured on a 2-core EPYC: 371 -> 241 ms for the 1/8 level,
# 90 -> 73 ms for the 1/16 level; the 1/32 level is one chunk.
UPSAMPLED_CONV_CHUNK_ELEMENTS = 1 << 22


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, size: Sequence[int],
                      add_to: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`conv2d(resize(x, size), weight, padding=1)` without the conv at the large size.

    Bilinear resizing acts on each channel alone and a conv tap mixes channels at one offset, so the
    9 taps' channel mixes run on the small map; resizing and shifting the mixed maps are then two small
    matmuls, along W and along H. Same function, other summation order (~1e-7 relative); about 3x
    fewer FLOPs at 2x upsampling, 10x at 4x. With `add_to` (a (b, out, *size) map) the result is added
    into it in place and `add_to` is returned: no full-size temporary.
    """
    b, c, h, w = x.shape
    out_ch = weight.shape[0]
    height, width = size
    result = add_to if add_to is not None else \
        x.new_empty(b, height, width, out_ch).permute(0, 3, 1, 2)  # NCHW, channels-last memory
    x = x.contiguous()
    cols = shifted_resize_matrices(w, width, x)
    rows = shifted_resize_matrices(h, height, x).permute(1, 0, 2).reshape(height, 3 * h)
    taps_weight = weight.permute(3, 2, 0, 1)  # (kx, ky, out, in)
    chunks = max(1, min(out_ch, -(-9 * out_ch * h * w // UPSAMPLED_CONV_CHUNK_ELEMENTS)))
    start = 0
    for part in taps_weight.tensor_split(chunks, dim=2):
        n = part.shape[2]
        taps = F.conv2d(x, part.reshape(9 * n, c, 1, 1)).view(b, 3, 3 * n * h, w)  # channels (kx, ky, o)
        along_w = F.linear(taps[:, 0], cols[0])
        for kx in (1, 2):
            along_w += F.linear(taps[:, kx], cols[kx])  # (b, (ky, o, r), width)
        along_w = along_w.view(b, 3, n, h, width).permute(0, 1, 3, 4, 2).reshape(b, 3 * h, width * n)
        out = (rows @ along_w).view(b, height, width, n).permute(0, 3, 1, 2)  # one GEMM along H
        target = result[:, start:start + n]
        if add_to is not None:
            target += out
        else:
            target.copy_(out)
        start += n
    return result


class FastUPerNetDecoder(UPerNetDecoder):
    """UPerNet whose fusion conv runs over the un-resized pyramid (``fused_bottleneck``) in CPU inference,
    with the library's own, unhooked ``fpn_bottleneck`` (hooks see the full concatenation)."""

    def fuse(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        block = self.fpn_bottleneck
        if (guards.fast_inference(outs[0]) and type(block) is ConvNormAct and type(block.conv) is nn.Conv2d
                and not guards.has_hooks(block)):
            return self.fused_bottleneck(outs)
        return super().fuse(outs)

    def fused_bottleneck(self, outs: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fpn_bottleneck(cat([outs[0], *resized outs[1:]]))` without resizing or concatenating.

        The 3x3 conv over the concatenation is a sum of convs over its parts; each coarse part runs
        through `upsampled_conv3x3`. Half of UPerHead's FLOPs at mmseg's sizes go away.
        """
        conv = self.fpn_bottleneck.conv
        parts = conv.weight.split([o.shape[1] for o in outs], dim=1)
        x = F.conv2d(outs[0], parts[0], conv.bias, padding=1)
        for out, weight in zip(outs[1:], parts[1:]):
            upsampled_conv3x3(out, weight, x.shape[-2:], add_to=x)
        return self.fpn_bottleneck.bn(x)  # BN + ReLU (or only ReLU once folded), called as a module


SWAPS = {UPerNetDecoder: FastUPerNetDecoder}

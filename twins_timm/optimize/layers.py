"""The CPU-inference layers ``optimize`` swaps in: subclasses of the plain ones, so parameter names, state
dict, ``isinstance`` and every hook stay; only ``forward`` changes, and only in eager CPU inference
(no autograd, fp32 / bf16: ``kernels.fast_inference``). Training, GPUs, TorchScript and export run the
plain layer's forward. Each holds its model's :class:`~twins_timm.optimize.kernels.KernelTable` as
``kernel_table``; a layer the user replaced or wrapped is not one of these and keeps its own forward.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from twins_timm.models.twins import Block, GlobalSubSampleAttn, LocallyGroupedAttn, PosConv, Size_, Twins, \
    window_attn_mask
from twins_timm.optimize import kernels
from twins_timm.optimize.kernels import PLAIN_TABLE, KernelTable

__all__ = ['Linear', 'Conv2d', 'InplaceGELU', 'FastLocallyGroupedAttn', 'FastGlobalSubSampleAttn', 'FastBlock',
           'FastPosConv', 'FastTwins']


def _inference(module: nn.Module, x: torch.Tensor) -> bool:
    """Eager CPU inference in eval mode: where the swapped-in paths (which skip dropout) apply."""
    return not module.training and kernels.fast_inference(x)


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU-inference forward takes the kernel its table picks for the shape
    (``F.linear`` or a oneDNN 1x1 conv); under torch.compile in CPU inference the one measured for it."""
    kernel_table: KernelTable = PLAIN_TABLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.compiled_inference(x):
            if kernels.compiled_linear_kernel(self, x.dtype) == kernels.ONEDNN:
                return kernels.onednn_linear(x, self.weight, self.bias)
            return F.linear(x, self.weight, self.bias)
        return kernels.linear(x, self.weight, self.bias, self.kernel_table)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` whose CPU-inference forward may take Winograd (3x3, stride 1, padding 1, no dilation
    or groups) where its table picks it; ``F.conv2d`` everywhere else.

    The transformed kernels are made on every call, never kept: a kept copy would miss weight changes that
    leave the parameter's version alone (``weight.data += delta``, as PEFT's merge does).
    """
    kernel_table: KernelTable = PLAIN_TABLE
    plain_base = nn.Conv2d  # the library's own conv, which fold_batchnorm may fold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.kernel_size == (3, 3) and self.stride == (1, 1) and self.padding == (1, 1) and self.groups == 1
                and self.dilation == (1, 1) and self.padding_mode == 'zeros'):
            return kernels.conv3x3(x, self.weight, self.bias, self.kernel_table)
        return self._conv_forward(x, self.weight, self.bias)


class InplaceGELU(nn.GELU):
    """GELU that overwrites its input when no gradient is recorded (inference): saves an allocation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.gelu(x, approximate=self.approximate)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class FastLocallyGroupedAttn(LocallyGroupedAttn):
    """LSA on a strided window view (no padding copy where the map fills the windows), all windows' heads
    as one batch of matmuls (through ``attn_drop``, where a hook sees all attention weights at once), or
    in cache-sized chunks of windows where the table picks that and no hook waits on ``attn_drop``."""
    kernel_table: KernelTable = PLAIN_TABLE

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if not _inference(self, x):
            return super().forward(x, size)
        B, N, C = x.shape
        H, W = size
        ws, nh = self.ws, self.num_heads
        padded = H % ws > 0 or W % ws > 0
        # padded tokens get qkv = bias and take part in attention, as in the original
        windows = self._windows(x.view(B, H, W, C)) if padded else \
            x.view(B, H // ws, ws, W // ws, ws, C).transpose(2, 3)
        gh, gw = windows.shape[1], windows.shape[2]  # windows per column / row
        qkv = self.qkv(windows).view(B * gh * gw, ws * ws, 3, nh, C // nh)
        mask: Optional[torch.Tensor] = None
        if self.window_mask and H % ws > 0 and W % ws > 0:
            mask = window_attn_mask(H, W, ws, x.device, qkv.dtype)
            mask = mask.unsqueeze(0).expand(B, -1, -1, -1).reshape(B * gh * gw, 1, ws * ws, ws * ws)
        x = None if kernels.has_hooks(self.attn_drop) else \
            kernels.window_attention(qkv, self.scale, mask, self._all_windows, self.kernel_table)
        if x is None:
            x = self._all_windows(qkv, mask)
        x = x.view(B, gh, gw, nh, ws, ws, C // nh).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, gh * ws * gw * ws, C)
        if padded:  # gather the H x W tokens back
            rows = torch.arange(H, device=x.device)[:, None] * (gw * ws) + torch.arange(W, device=x.device)
            x = x.index_select(1, rows.view(-1))
        return self.proj_drop(self.proj(x.reshape(B, N, C)))

    def _all_windows(self, qkv: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """All windows' heads as one batch of matmuls (qkv: (Bw, L, 3, nh, d); mask: (Bw, 1, L, L)), out
        (Bw, nh, L, d): 49-token windows, where these beat the fused kernel. q and k are scaled by
        sqrt(scale) each, as torch's math path (timm's 5-D SDPA call) does."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        root_scale = self.scale ** 0.5
        attn = (q * root_scale) @ (k * root_scale).transpose(-2, -1)
        if mask is not None:
            attn = attn + mask
        return self.attn_drop(attn.softmax(dim=-1)) @ v

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> zero-padded (B, gh, gw, ws, ws, C) window view, gh = ceil(H / ws)."""
        ws = self.ws
        x = F.pad(x, (0, 0, 0, ws - 1, 0, ws - 1))
        return x.unfold(1, ws, ws).unfold(2, ws, ws).permute(0, 1, 2, 4, 5, 3)


class FastGlobalSubSampleAttn(GlobalSubSampleAttn):
    """GSA whose reduction conv reads the tokens as a channels-last map (no layout copies), with the
    attention as oneDNN grouped 1x1 convs where the table picks that."""
    kernel_table: KernelTable = PLAIN_TABLE

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if not _inference(self, x) or not self.fused_attn:
            return super().forward(x, size)
        B, N, C = x.shape
        nh = self.num_heads
        q = self.q(x)
        if self.sr is not None:
            x = self.sr(x.view(B, size[0], size[1], C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = self.norm(x).reshape(B, -1, C)
        kv = self.kv(x).view(B, -1, 2, nh, C // nh)
        out = kernels.attention(q, kv[:, :, 0], kv[:, :, 1], self.scale, self.kernel_table)
        if out is None:
            q = q.view(B, N, nh, C // nh).transpose(1, 2)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(out))


class FastBlock(Block):
    """Block whose residuals are added in place into the fresh branch outputs, and whose MLP runs over
    cache-sized row chunks, each through ``norm2`` and ``mlp``, where the table picks that and no hook
    watches them (hooks see whole tensors)."""
    kernel_table: KernelTable = PLAIN_TABLE

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if not _inference(self, x):
            return super().forward(x, size)
        x = self.drop_path1(self.attn(self.norm1(x), size)).add_(x)
        chunks = self._mlp_row_chunks(x)
        if chunks > 1:
            for rows in x.view(-1, x.shape[-1]).tensor_split(chunks):
                rows.add_(self.mlp(self.norm2(rows)))
            return x
        return self.drop_path2(self.mlp(self.norm2(x))).add_(x)

    @staticmethod
    def optimized_children(block: Block) -> None:
        """The MLP's GELU works in place: its input is fc1's fresh output."""
        act = getattr(block.mlp, 'act', None)
        if type(act) is nn.GELU:
            act.__class__ = InplaceGELU

    def _mlp_row_chunks(self, x: torch.Tensor) -> int:
        """Row chunks of the inference MLP: >1 where the hidden activation would leave the caches and
        the table picks 'rows' for this shape."""
        hidden = getattr(getattr(self.mlp, 'fc1', None), 'out_features', None)  # a user's own MLP: no chunks
        if not isinstance(hidden, int) or not _inference(self, x) or not x.is_contiguous():
            return 1
        chunks = kernels.row_chunks(x, hidden)
        if chunks == 1 or kernels.has_hooks(self.norm2, self.mlp):
            return 1
        choice = kernels.mlp_kernel(x, self.norm2, self.mlp, hidden, chunks, self.kernel_table)
        return chunks if choice == kernels.ROWS else 1


class FastPosConv(PosConv):
    """PEG on a channels-last view of the tokens: no layout copy on either side."""
    kernel_table: KernelTable = PLAIN_TABLE

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if not kernels.fast_inference(x):
            return super().forward(x, size)
        B, N, C = x.shape
        feat = x.view(B, size[0], size[1], C).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
        out = self.proj(feat)
        if self.stride == 1:
            out += feat  # conv output is fresh and not saved for backward
        return out.permute(0, 2, 3, 1).reshape(B, -1, C)


class FastTwins(Twins):
    """Twins handing stage maps on as channels-last views (oneDNN's patch conv reads them directly)."""
    kernel_table: KernelTable = PLAIN_TABLE

    def _stage_map(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if not kernels.fast_inference(x):
            return super()._stage_map(x, size)
        return x.reshape(x.shape[0], size[0], size[1], -1).permute(0, 3, 1, 2)


SWAPS = {nn.Linear: Linear, nn.Conv2d: Conv2d, LocallyGroupedAttn: FastLocallyGroupedAttn,
         GlobalSubSampleAttn: FastGlobalSubSampleAttn, Block: FastBlock, PosConv: FastPosConv, Twins: FastTwins}

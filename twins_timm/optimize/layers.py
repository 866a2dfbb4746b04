"""The backbone layers ``optimize`` swaps in: subclasses of the plain ones, so parameter names, state dict,
``isinstance`` and every hook stay; only ``forward`` changes, and only in eager CPU inference (no autograd,
fp32 / bf16: ``kernels.fast_inference``). Training, GPUs, TorchScript, compile and export run the plain
layer's forward. A layer the user replaced or wrapped is not one of these and keeps its own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from twins_timm.models.twins import Block, Size_
from twins_timm.optimize import kernels
from twins_timm.optimize.kernels import PLAIN_TABLE, KernelTable

__all__ = ['InplaceGELU', 'FastBlock']


class InplaceGELU(nn.GELU):
    """GELU that overwrites its input when no gradient is recorded (inference): saves an allocation.

    ``torch.ops.aten.gelu_`` is ATen's in-place GELU, which torch exposes under no other name.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.gelu(x, approximate=self.approximate)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


class FastBlock(Block):
    """Block whose MLP runs over cache-sized row chunks, each through ``norm2`` and ``mlp`` and added in
    place into the fresh attention sum, where the table picks that and no hook watches them (hooks see
    whole tensors)."""
    kernel_table: KernelTable = PLAIN_TABLE

    def forward(self, x: torch.Tensor, size: Size_) -> torch.Tensor:
        if self.training or not kernels.fast_inference(x):
            return super().forward(x, size)
        x = x + self.drop_path1(self.attn(self.norm1(x), size))
        chunks = self._mlp_row_chunks(x)
        if chunks == 1:
            return x + self.drop_path2(self.mlp(self.norm2(x)))
        for rows in x.view(-1, x.shape[-1]).tensor_split(chunks):
            rows.add_(self.mlp(self.norm2(rows)))
        return x

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
        if not isinstance(hidden, int) or self.training or not kernels.fast_inference(x) or not x.is_contiguous():
            return 1
        chunks = kernels.row_chunks(x, hidden)
        if chunks == 1 or kernels.has_hooks(self.norm2, self.mlp):
            return 1
        choice = kernels.mlp_kernel(x, self.norm2, self.mlp, hidden, chunks, self.kernel_table)
        return chunks if choice == kernels.ROWS else 1


SWAPS = {Block: FastBlock}

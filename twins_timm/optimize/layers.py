"""The backbone change ``optimize`` makes: the Twins MLP's GELU works in place, a subclass of
``nn.GELU`` (state dict, ``isinstance`` and hooks stay) that differs only when no gradient is recorded.
Only inside a Twins ``Block``'s ``mlp``, where the GELU's input is fc1's fresh output; a GELU the user
replaced or wrapped is not an ``nn.GELU`` and keeps its own forward.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from twins_timm.models.twins import Block

__all__ = ['InplaceGELU', 'inplace_mlp_gelu']


class InplaceGELU(nn.GELU):
    """GELU that overwrites its input when no gradient is recorded (inference): saves an allocation.

    ``torch.ops.aten.gelu_`` is ATen's in-place GELU, which torch exposes under no other name.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return F.gelu(x, approximate=self.approximate)
        return torch.ops.aten.gelu_(x, approximate=self.approximate)


def inplace_mlp_gelu(block: Block) -> None:
    """The block's MLP GELU works in place: its input is fc1's fresh output."""
    act = getattr(block.mlp, 'act', None)
    if type(act) is nn.GELU:
        act.__class__ = InplaceGELU

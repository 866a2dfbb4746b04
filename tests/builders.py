"""Segmenters built without their weight init, for tests where the weight values do not matter.

timm's and SMP's init (trunc_normal_ / kaiming over every parameter) costs ~0.2-0.5 s per S model;
our models skip it when built on the meta device. ``on_meta`` is for config and metadata checks (no
values at all); ``seeded`` fills every parameter and buffer with ``references.randomize_`` values.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from references import randomize_

__all__ = ['on_meta', 'fill_', 'seeded']


def on_meta(cls: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` on the meta device (shapes, config, metadata; no init runs there)."""
    with torch.device('meta'):
        return cls(*args, **kwargs)


@torch.no_grad()
def fill_(model: nn.Module, seed: int = 0, buffers: bool = True) -> nn.Module:
    """``references.randomize_`` values in eval mode, over NaN: every parameter (and buffer, unless
    ``buffers=False``) is checked to have been filled, so no uninitialised memory is used."""
    tensors = [*model.named_parameters(), *(model.named_buffers() if buffers else ())]
    for _, t in tensors:
        t.fill_(float('nan') if t.is_floating_point() else 0)
    randomize_(model, seed)
    unfilled = [n for n, t in tensors if t.is_floating_point() and torch.isnan(t).any()]
    assert not unfilled, f'randomize_ left these unfilled: {unfilled[:5]}'
    return model.eval()


def seeded(cls: Callable[..., nn.Module], *args: Any, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``cls(*args, **kwargs)`` built on meta, with seeded ``randomize_`` weights (``fill_``) in eval mode."""
    return fill_(on_meta(cls, *args, **kwargs).to_empty(device='cpu'), seed)

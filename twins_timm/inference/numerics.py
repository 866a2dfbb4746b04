"""How two fp32 computations of the same function are compared: the bench reports it, the tests assert it.

Rounding grows with the numbers' size (1e-5 is ~80 float32 steps at magnitude 1, ~5 at magnitude 20, as
deep Twins features reach), so besides the largest absolute difference ``scaled_diff`` divides each
output's by max(1, max |reference|): 1e-5 then means the same everywhere.
"""
from typing import Any

import torch

__all__ = ['max_abs_diff', 'scaled_diff']


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over a tensor or over matching sequences of tensors (no autograd record)."""
    if isinstance(a, torch.Tensor):
        return float((a.detach().float() - b.detach().float()).abs().max())
    return max(max_abs_diff(x, y) for x, y in zip(a, b))


def scaled_diff(a: Any, b: Any) -> float:
    """max_abs_diff per output divided by max(1, max |b|)."""
    if isinstance(a, torch.Tensor):
        return max_abs_diff(a, b) / max(1.0, float(b.detach().float().abs().max()))
    return max(scaled_diff(x, y) for x, y in zip(a, b))

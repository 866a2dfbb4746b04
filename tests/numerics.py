"""How tests compare fp32 outputs: the largest absolute difference, measured against the output's scale.

Two computations of the same function in fp32 differ by rounding, which grows with the size of the
numbers: 1e-5 is ~80 float32 steps at magnitude 1 but only ~5 at magnitude 20 (deep Twins features).
``scaled_diff`` divides by max(1, max |reference|), so 1e-5 means the same everywhere (the measure
`twins-timm bench` reports as scaled_diff).
"""
from typing import Any

import torch

__all__ = ['FP32_TOL', 'assert_scaled_close', 'max_diff', 'scaled_diff']

FP32_TOL = 1e-5


def max_diff(a: Any, b: Any) -> float:
    """Largest |a - b| over a tensor or over matching sequences of tensors."""
    if isinstance(a, torch.Tensor):
        return float((a.float() - b.float()).abs().max())
    return max(max_diff(x, y) for x, y in zip(a, b))


def scaled_diff(a: Any, b: Any) -> float:
    """max_diff per output divided by max(1, max |b|): rounding grows with the numbers' size."""
    if isinstance(a, torch.Tensor):
        return max_diff(a, b) / max(1.0, float(b.float().abs().max()))
    return max(scaled_diff(x, y) for x, y in zip(a, b))



def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL) -> None:
    """``torch.testing.assert_close`` with the tolerance relative to the output's scale (see above)."""
    scale = max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol * scale)

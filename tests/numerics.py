"""How tests compare fp32 outputs: the largest absolute difference, measured against the output's scale.

Two computations of the same function in fp32 differ by rounding, which grows with the size of the
numbers: 1e-5 is ~80 float32 steps at magnitude 1 but only ~5 at magnitude 20 (deep Twins features).
``scaled_diff`` divides by max(1, max |reference|), so 1e-5 means the same everywhere.
"""
from typing import Sequence, Union

import torch

Outputs = Union[torch.Tensor, Sequence[torch.Tensor]]
FP32_TOL = 1e-5


def _pairs(a: Outputs, b: Outputs):
    if isinstance(a, torch.Tensor):
        return [(a, b)]
    assert len(a) == len(b)
    return list(zip(a, b))


def max_diff(a: Outputs, b: Outputs) -> float:
    """Largest absolute difference over one tensor or matching lists of tensors."""
    return max(float((x - y).abs().max()) for x, y in _pairs(a, b))


def scaled_diff(a: Outputs, b: Outputs) -> float:
    """Largest absolute difference, each pair divided by max(1, max |b|)."""
    return max(float((x - y).abs().max()) / max(1.0, float(y.abs().max())) for x, y in _pairs(a, b))

"""How tests compare fp32 outputs: the measure `twins-timm bench` reports (twins_timm.inference.numerics),
asserted at FP32_TOL of the output's scale."""
import torch

from twins_timm.inference.numerics import max_abs_diff as max_diff, scaled_diff

__all__ = ['FP32_TOL', 'assert_scaled_close', 'max_diff', 'scaled_diff']

FP32_TOL = 1e-5


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = FP32_TOL) -> None:
    """``torch.testing.assert_close`` with the tolerance relative to the output's scale (see above)."""
    scale = max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=tol * scale)

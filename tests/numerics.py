"""How tests compare fp32 outputs: the largest absolute difference, measured against the output's scale.

Two computations of the same function in fp32 differ by rounding, which grows with the size of the
numbers: 1e-5 is ~80 float32 steps at magnitude 1 but only ~5 at magnitude 20 (deep Twins features).
``scaled_diff`` divides by max(1, max |reference|), so 1e-5 means the same everywhere. The functions are
the benchmark's own, so tests and `twins-timm bench` report the same measure.
"""
from twins_timm.tools.bench import max_abs_diff as max_diff, scaled_diff

__all__ = ['FP32_TOL', 'max_diff', 'scaled_diff']

FP32_TOL = 1e-5

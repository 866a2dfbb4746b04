"""How the bench measures: interleaved timing, the matmul rate, FLOP counts, the speed ceiling, compile checks."""
from __future__ import annotations

import contextlib
import shutil
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from twins_timm.devtools.speed_ceiling import flop_mapping, speed_ceiling
from twins_timm.inference.numerics import max_abs_diff, scaled_diff


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def precision_context(precision: str, device: str) -> contextlib.AbstractContextManager:
    if precision == 'bf16':
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def time_interleaved(fns: Dict[str, Callable[[], Any]], warmup: int, repeats: int,
                     device: str) -> Dict[str, Dict[str, Any]]:
    """Warm-up, then `repeats` rounds of A B A B ...; per function the median and all times (s)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    first_call: Dict[str, float] = {}
    for i in range(warmup):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i == 0:
                first_call[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: {'seconds': statistics.median(v), 'all_seconds': v,
                'first_call_seconds': first_call.get(k)} for k, v in times.items()}


def _onednn_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` by oneDNN: a 1x1 convolution over a channels-last view of the rows (free views). On some
    CPUs oneDNN's GEMM outruns ``torch.mm``'s, so the faster of the two is the machine's best GEMM rate."""
    rows, k = a.shape
    return F.conv2d(a.reshape(1, rows, 1, k).permute(0, 3, 1, 2), b.view(b.shape[0], k, 1, 1))


def matmul_rate(n: int, device: str, dtype: torch.dtype, warmup: int, repeats: int) -> Dict[str, Any]:
    """GFLOP/s of an n x n matmul (2 n^3 FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    with torch.inference_mode():
        res = time_interleaved({'mm': lambda: torch.mm(a, b)}, max(warmup, 1), max(repeats, 3), device)['mm']
    flops = 2 * n ** 3
    out = {'n': n, 'dtype': str(dtype).replace('torch.', ''), 'flops': flops,
           'seconds': res['seconds'], 'gflops': flops / res['seconds'] / 1e9, 'onednn_gflops': None}
    if device == 'cpu' and torch.backends.mkldnn.is_available():
        with torch.inference_mode():
            res = time_interleaved({'mm': lambda: _onednn_product(a, b)}, max(warmup, 1), max(repeats, 3),
                                   device)['mm']
        out['onednn_gflops'] = flops / res['seconds'] / 1e9
    out['best_gflops'] = max(out['gflops'], out['onednn_gflops'] or 0.0)
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of a plain model (the reference's work; no calibration runs inside the count);
    attention included (torch's counter has no formula for the CPU flash kernel)."""
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def diffs(got: Any, want: Any) -> Tuple[float, float]:
    """(max_abs_diff, scaled_diff) of one output against its reference."""
    return max_abs_diff(got, want), scaled_diff(got, want)


def speed(seconds: float, batch: int, flops: int, mm: Dict[str, Any]) -> Dict[str, float]:
    gflops = flops / seconds / 1e9
    return {'seconds': seconds, 'images_per_s': batch / seconds, 'gflops': gflops,
            'pct_matmul': 100.0 * gflops / mm['gflops'], 'pct_gemm': 100.0 * gflops / mm['best_gflops']}


def ceiling_summary(fn: Callable[[], Any], flops: int, ours_seconds: float, reference_seconds: float,
                    mm: Dict[str, Any], device: str) -> Dict[str, Any]:
    """The speed ceiling of ``fn`` (already warm) beside its measured time (METHODS['ceiling'])."""
    c = speed_ceiling(fn, sync=lambda: sync(device))
    seconds = max(c['seconds'], 1e-12)
    gflops = flops / seconds / 1e9
    return dict(c, gflops=gflops, pct_gemm=100.0 * gflops / mm['best_gflops'],
                outside_share=max(0.0, 1.0 - seconds / ours_seconds), ratio=reference_seconds / seconds)


def compile_unavailable_reason(device: str, backend: str) -> Optional[str]:
    """Why torch.compile cannot run here (None when it can): inductor on CPU needs a C++ compiler."""
    if not hasattr(torch, 'compile'):
        return 'this torch has no torch.compile'
    if backend == 'inductor' and device == 'cpu':
        try:
            from torch._inductor import config as inductor_config
            cxx = inductor_config.cpp.cxx
            configured = cxx if isinstance(cxx, (list, tuple)) else (cxx,)
            candidates = [c for c in configured if c] + ['g++', 'c++', 'clang++']
        except Exception:  # pragma: no cover - private API moved
            candidates = ['g++', 'c++', 'clang++']
        if not any(shutil.which(c) for c in candidates):
            return 'no C++ compiler found (%s); inductor needs one on CPU' % ', '.join(candidates)
    if backend == 'inductor' and device == 'cuda':
        try:
            import triton  # noqa: F401
        except ImportError:
            return 'triton is not installed; inductor needs it on CUDA'
    return None


@contextlib.contextmanager
def inductor_freezing(enable: bool):
    """Inductor's freezing (constant weights, prepacked for the CPU GEMM / conv libraries) while compiling."""
    if not enable:
        yield
        return
    from torch._inductor import config as inductor_config
    with inductor_config.patch(freezing=True):
        yield


def short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return '%s: %s' % (type(e).__name__, text[0][:300] if text else '')

"""Benchmark our Twins against timm's Twins and mmseg's segmenters; print a table, write JSON.

In one run, with the same seeded weights and inputs on both sides:
  * backbones: ours vs timm's Twins (features_only semantics: `forward_intermediates(x,
    intermediates_only=True)`), eval, inference mode, eager and `torch.compile`d: images/s, the
    ratio, GFLOP/s (counted with torch.utils.flop_counter) and the % of the fp32 matmul rate
    measured in the same run, beside the speed ceiling: the rate if nothing but the model's matrix
    products, norms, softmaxes and resizes took time, each timed alone (twins_timm.devtools.speed_ceiling);
  * segmenters: our TwinsFPN / TwinsUPerNet vs mmsegmentation's own models end to end (only when
    mmsegmentation is installed; it is never needed otherwise);
  * peak training memory (forward + backward) with and without gradient checkpointing;
  * on a CUDA device, all of the above again under bf16 autocast.
Speeds are the median of repeated runs after warm-up, ours and the reference interleaved
(A B A B ...) so that machine noise hits both alike. The JSON holds every measurement, the machine
and the method of each measurement.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from twins_timm.devtools.engine_bench import METHOD as ENGINES_METHOD
from twins_timm.devtools.engine_bench import prepare_engines
from twins_timm.deploy.engines import native_bf16
from twins_timm.optimize import optimize
from twins_timm.optimize.kernels import KernelTable
from twins_timm.devtools import mmseg_reference
from twins_timm.commands.common import add_kernels_argument
from twins_timm.devtools.speed_ceiling import flop_mapping, speed_ceiling
from twins_timm.files.paths import check_output_file
from twins_timm.inference.numerics import max_abs_diff, scaled_diff

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm bench --quick                      # S variants, 2x512x512, a few minutes on 2 cores
  twins-timm bench --json bench.json --force    # everything: six variants, two sizes (long)
  twins-timm bench --variants twins_svt_small --sizes 2x512x512,32x224x224 --no-segmenters
  twins-timm bench --no-backbones --no-memory --repeats 3   # segmenters vs mmseg only
  twins-timm bench --threads 2 --repeats 5 --no-compile --no-memory
  twins-timm bench --quick --engines --no-memory   # + torch / ONNX Runtime / OpenVINO, fp32 and bf16
"""

VARIANTS = ('twins_pcpvt_small', 'twins_pcpvt_base', 'twins_pcpvt_large',
            'twins_svt_small', 'twins_svt_base', 'twins_svt_large')
QUICK_VARIANTS = ('twins_pcpvt_small', 'twins_svt_small')
DEFAULT_SIZES = '2x512x512,32x224x224'
QUICK_SIZES = '2x512x512'
HEADS = ('fpn', 'upernet')
DEFAULT_JSON = 'twins-timm-bench.json'
MMAP_THRESHOLD = 128 * 1024  # bytes; glibc malloc setting of the memory subprocesses

CEILING_LEGEND = 'ceiling: ours if nothing but its products, norms, softmaxes and resizes took time, each timed alone'

METHODS = {
    'timing': 'warm-up runs, then the median of --repeats runs; the compared models run interleaved '
              '(A B A B ...) on the same input so that machine noise hits both alike',
    'backbone': 'features_only semantics: forward_intermediates(x, intermediates_only=True) -> 4 NCHW maps; '
                'eval, torch.inference_mode(); our seeded random weights loaded strictly into '
                "timm's own timm.models.twins.Twins",
    'flops': 'torch.utils.flop_counter.FlopCounterMode over one forward of our model per input on its plain '
             'path (the plain model, before twins_timm.optimize: the work timm / mmseg do for the same function; matmuls, convolutions '
             'and attention; 2 FLOPs per multiply-add); the same count is used for the reference, so GFLOP/s '
             "compare work done. Our inference shortcuts that do less work (UPerHead's fused bottleneck, "
             'Winograd convolutions) show as effective rates, which can pass 100 % of the matmul rate',
    'matmul_rate': 'N x N @ N x N matmul (2 N^3 FLOPs) in the benchmark dtype, median of repeats, '
                   'measured in the same run; pct_matmul = model GFLOP/s / matmul GFLOP/s. On CPU the same '
                   "product is also timed through oneDNN (a 1x1 convolution, the other kernel twins_timm's "
                   'inference linear can choose): onednn_gflops; pct_gemm = model GFLOP/s / the faster of the two',
    'ceiling': 'the speed ceiling of our model (twins_timm.devtools.speed_ceiling): one eager forward recorded op by '
               'op, then every matrix product (linear, matmul, mm / bmm, convolution, attention) and every other op '
               'no implementation can skip or fold into a product (LayerNorm, softmax, resizes) replayed alone on '
               'fresh inputs of the same shapes and strides, two warm-up runs, then the best of 5; their sum is the '
               'time the forward would take if nothing else took time (product_seconds + other_seconds). pct_gemm: '
               'the model FLOPs over that time, against the best matmul rate (about the most our % of best GEMM '
               'can be); outside_share: the part of our measured time spent outside those ops; ratio: the '
               "reference's time over the ceiling (about the most our speed-up can be without faster kernels). "
               'A measurement, not a proof: each replay pays its own memory costs. ops: every distinct call',
    'kernels': "the kernel table all our optimized models share in this run (twins_timm.optimize(model, "
               "kernels=--kernels)): for every layer shape they met, the kernel its calibration chose "
               '(plain = what timm calls, onednn = a oneDNN convolution, rows = '
               'the MLP over cache-sized row chunks instead of the whole tensor, winograd = a 3x3 convolution by '
               'Winograd F(2x2, 3x3)) and the '
               'GFLOP/s each kernel reached in the calibration (interleaved, best of 3 short runs); choices: the '
               'table to pass back as --kernels (or optimize(model, kernels=...)) for the same kernels again',
    'exact': "our plain model (timm.create_model, without twins_timm.optimize): timm's Twins, bit-identical "
             'to it. Timed in the same interleaved rounds',
    'diff': 'max_abs_diff = max |ours - reference| over all outputs; scaled_diff divides each output\'s by '
            'max(1, max |reference|)',
    'compile': "torch.compile(model) (default mode, backend --compile-backend) of both models, with inductor's "
               'freezing (weights as constants, prepacked) unless --no-freezing; ours traces the linear kernel '
               "measured for each layer while compiling (kernel family 'compiled linear'); compilation happens "
               'in the warm-up and is reported separately as compile_s',
    'segmenters': "our TwinsFPN / TwinsUPerNet forward vs mmseg's EncoderDecoder.encode_decode (whole-image "
                  "inference) built from mmseg's own ADE20K config (SyncBN -> BN), seeded random weights "
                  'converted with twins_timm.convert; logits at the input size',
    'memory_cpu': 'fresh process per configuration (forked from one subprocess that has imported torch and timm, '
                  'where os.fork exists): peak RSS after one forward + backward of our backbone '
                  '(train mode, loss = sum of the 4 feature means) minus the RSS after model and input creation; '
                  'the high-water mark is reset first (/proc/self/clear_refs, read as VmHWM), else '
                  'resource.getrusage ru_maxrss before and after; glibc MALLOC_MMAP_THRESHOLD_=131072 so that '
                  'freed tensors leave the RSS',
    'memory_cuda': 'torch.cuda.max_memory_allocated after one forward + backward minus the memory allocated '
                   'after model and input creation',
}


# ------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--quick', action='store_true',
                        help='short run: S variants, 2x512x512, 3 repeats, no torch.compile, segmenters (1x512x512) '
                             'and memory for the first variant only (options given explicitly still win)')
    parser.add_argument('--variants', metavar='LIST',
                        help='comma-separated Twins variants (default: all six; --quick: %s)'
                             % ','.join(QUICK_VARIANTS))
    parser.add_argument('--sizes', metavar='LIST',
                        help='comma-separated BATCHxHEIGHTxWIDTH backbone inputs (default %s; --quick: %s)'
                             % (DEFAULT_SIZES, QUICK_SIZES))
    parser.add_argument('--repeats', type=int, metavar='N', help='timed runs per model (default 10; --quick: 3)')
    parser.add_argument('--warmup', type=int, metavar='N', help='untimed runs first (default 2)')
    parser.add_argument('--threads', type=int, metavar='N',
                        help='torch CPU threads (default: all cores available to this process)')
    parser.add_argument('--device', default='auto', help="'cpu', 'cuda' or 'auto' (default: cuda if present)")
    parser.add_argument('--matmul-size', type=int, default=2048, metavar='N',
                        help='N of the N x N reference matmul (default 2048)')
    parser.add_argument('--compile', dest='compile', action='store_true', default=None,
                        help='include the torch.compile comparison (default: yes, except with --quick)')
    parser.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile comparison')
    parser.add_argument('--compile-backend', default='inductor', help='torch.compile backend (default inductor)')
    parser.add_argument('--no-freezing', action='store_true',
                        help="compile without inductor's freezing (default: freezing on, both models)")
    parser.add_argument('--no-backbones', action='store_true', help="skip the backbones (ours vs timm's Twins)")
    parser.add_argument('--no-segmenters', action='store_true', help="skip our segmenters vs mmseg's")
    parser.add_argument('--heads', default=','.join(HEADS), metavar='LIST',
                        help='segmenter heads to compare (default fpn,upernet)')
    parser.add_argument('--segmenter-size', metavar='BxHxW',
                        help='segmenter input (default 2x512x512; --quick: 1x512x512)')
    parser.add_argument('--engines', action='store_true',
                        help='also time the CPU inference engines side by side: torch, ONNX Runtime and OpenVINO, '
                             'fp32 and bf16 (where the CPU has native bf16), for the backbones (first of --sizes) and '
                             'the segmenters, with each one\'s parity against torch fp32 and the export and '
                             'first-call times apart; needs pip install "twins-timm[deploy]"')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak training memory measurement')
    parser.add_argument('--memory-size', default='2x512x512', metavar='BxHxW',
                        help='training memory input (default 2x512x512)')
    parser.add_argument('--json', metavar='PATH', default=DEFAULT_JSON,
                        help='where to write the results (default ./%s)' % DEFAULT_JSON)
    parser.add_argument('--force', action='store_true', help='overwrite an existing --json file')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random weights and inputs')
    add_kernels_argument(parser)
    parser.add_argument('--quiet', action='store_true', help='no progress lines (the table is still printed)')


def parse_size(text: str) -> Tuple[int, int, int]:
    """'2x512x512' -> (2, 512, 512)."""
    parts = text.lower().strip().split('x')
    try:
        b, h, w = (int(p) for p in parts)
    except ValueError:
        raise ValueError('size %r is not BATCHxHEIGHTxWIDTH, e.g. 2x512x512' % text) from None
    if b < 1 or h < 32 or w < 32:
        raise ValueError('size %r: batch must be >= 1 and height, width >= 32' % text)
    return b, h, w


def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(',') if t.strip()]


def resolve_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Validate the arguments up front (before minutes of measuring) and fill in the defaults."""
    quick = bool(args.quick)
    variants = _split(args.variants) if args.variants else list(QUICK_VARIANTS if quick else VARIANTS)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError('unknown variant(s) %s; choose from %s'
                         % (', '.join(unknown) or '(none)', ', '.join(VARIANTS)))
    sizes = [parse_size(s) for s in _split(args.sizes or (QUICK_SIZES if quick else DEFAULT_SIZES))]
    if not sizes:
        raise ValueError('--sizes is empty; give e.g. 2x512x512')
    heads = _split(args.heads)
    if any(h not in HEADS for h in heads):
        raise ValueError('--heads must be a comma-separated subset of %s, got %r' % (','.join(HEADS), args.heads))
    repeats = args.repeats if args.repeats is not None else (3 if quick else 10)
    warmup = args.warmup if args.warmup is not None else 2
    if repeats < 1 or warmup < 0:
        raise ValueError('--repeats must be >= 1 and --warmup >= 0')
    if args.device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif args.device in ('cpu', 'cuda'):
        device = args.device
        if device == 'cuda' and not torch.cuda.is_available():
            raise ValueError('--device cuda: no CUDA device is available; use --device cpu')
    else:
        raise ValueError("--device must be 'cpu', 'cuda' or 'auto', got %r" % args.device)
    threads = args.threads if args.threads is not None else _available_cores()
    if threads < 1:
        raise ValueError('--threads must be >= 1')
    if args.matmul_size < 64:
        raise ValueError('--matmul-size must be >= 64')
    json_path = Path(args.json)
    check_output_file(json_path, '--json', force=args.force)  # before any measuring: a probe file, not os.access
    return dict(
        quick=quick, variants=variants, sizes=sizes, heads=heads, repeats=repeats, warmup=warmup,
        device=device, threads=threads, matmul_size=args.matmul_size,
        compile=(not quick) if args.compile is None else bool(args.compile),
        compile_backend=args.compile_backend, freezing=not getattr(args, 'no_freezing', False),
        backbones=not args.no_backbones, segmenters=not args.no_segmenters,
        segmenter_size=parse_size(args.segmenter_size or ('1x512x512' if quick else '2x512x512')),
        engines=bool(args.engines),
        memory=not args.no_memory, memory_size=parse_size(args.memory_size),
        memory_variants=variants[:1] if quick and not args.variants else variants,
        segmenter_variants=variants[:1] if quick and not args.variants else variants,
        precisions=['fp32'] + (['bf16'] if device == 'cuda' else []),
        json=str(json_path), seed=args.seed, quiet=bool(args.quiet),
        kernels=KernelTable.from_spec(args.kernels),  # one table for all our optimized models
    )


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------ model building
class Intermediates(nn.Module):
    """features_only semantics for any Twins: the 4 NCHW stage maps from forward_intermediates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, intermediates_only=True)


@torch.no_grad()
def seeded_fill_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random values in every parameter and buffer (also after `to_empty`).

    Matrices get fan-in scaled normals, 1-D weights (norms) 1 + noise, biases and running means small
    noise, running variances 0.5..1.5, integer buffers 0: fast (no trunc_normal) and numerically sane.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        leaf = name.rsplit('.', 1)[-1]
        if not t.is_floating_point():
            t.zero_()
            continue
        shape = t.shape
        if leaf == 'running_var':
            value = 0.5 + torch.rand(shape, generator=gen)
        elif t.ndim >= 2:
            value = torch.randn(shape, generator=gen) / max(t[0].numel(), 1) ** 0.5
        elif leaf == 'weight':
            value = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            value = 0.1 * torch.randn(shape, generator=gen)
        t.copy_(value.to(t.dtype))
    return model


def _materialize(build: Callable[[], nn.Module], device: str, seed: int) -> nn.Module:
    """Build on the meta device (no slow trunc_normal init), allocate on `device`, seeded fill."""
    with torch.device('meta'):
        model = build()
    return seeded_fill_(model.to_empty(device=device), seed).eval()


def build_backbone_pair(variant: str, device: str, seed: int,
                        kernels: KernelTable) -> Tuple[nn.Module, nn.Module, nn.Module]:
    """(ours optimized, ours plain, timm's) Twins with identical weights, wrapped for features_only semantics."""
    import timm
    import timm.models.twins as timm_twins

    import twins_timm  # noqa: F401  registers ours under the timm names
    ours = _materialize(lambda: timm.create_model(variant, pretrained=False), device, seed)
    ref = getattr(timm_twins, variant)(pretrained=False, device='meta')
    if type(ref).__module__ != 'timm.models.twins':  # pragma: no cover - guard against a mix-up
        raise RuntimeError('expected timm\'s own Twins as the reference, got %s' % type(ref))
    ref = ref.to_empty(device=device)
    ref.load_state_dict(ours.state_dict(), strict=True)
    optimized = optimize(copy.deepcopy(ours), kernels=kernels)
    return Intermediates(optimized).eval(), Intermediates(ours).eval(), Intermediates(ref.eval()).eval()


# ----------------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
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
            _sync(device)
            if i == 0:
                first_call[name] = time.perf_counter() - t0
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {k: {'seconds': statistics.median(v), 'all_seconds': v,
                'first_call_seconds': first_call.get(k)} for k, v in times.items()}


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
        from twins_timm.optimize.kernels import onednn_linear
        with torch.inference_mode():
            res = time_interleaved({'mm': lambda: onednn_linear(a, b)}, max(warmup, 1), max(repeats, 3),
                                   device)['mm']
        out['onednn_gflops'] = flops / res['seconds'] / 1e9
    out['best_gflops'] = max(out['gflops'], out['onednn_gflops'] or 0.0)
    return out


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of a plain model (the reference's work; no calibration runs inside the count);
    attention included (torch's counter has no formula for the CPU flash kernel)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def diffs(got: Any, want: Any) -> Tuple[float, float]:
    """(max_abs_diff, scaled_diff) of one output against its reference."""
    return max_abs_diff(got, want), scaled_diff(got, want)


def _speed(seconds: float, batch: int, flops: int, mm: Dict[str, Any]) -> Dict[str, float]:
    gflops = flops / seconds / 1e9
    return {'seconds': seconds, 'images_per_s': batch / seconds, 'gflops': gflops,
            'pct_matmul': 100.0 * gflops / mm['gflops'], 'pct_gemm': 100.0 * gflops / mm['best_gflops']}


def ceiling_summary(fn: Callable[[], Any], flops: int, ours_seconds: float, reference_seconds: float,
                    mm: Dict[str, Any], device: str) -> Dict[str, Any]:
    """The speed ceiling of ``fn`` (already warm) beside its measured time (METHODS['ceiling'])."""
    c = speed_ceiling(fn, sync=lambda: _sync(device))
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
def _inductor_freezing(enable: bool):
    """Inductor's freezing (constant weights, prepacked for the CPU GEMM / conv libraries) while compiling."""
    if not enable:
        yield
        return
    from torch._inductor import config as inductor_config
    with inductor_config.patch(freezing=True):
        yield


def _short_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return '%s: %s' % (type(e).__name__, text[0][:300] if text else '')


# ------------------------------------------------------------------------------- the sections
class Bench:
    def __init__(self, settings: Dict[str, Any]):
        self.s = settings
        self.device = settings['device']
        self.results: Dict[str, Any] = {}

    def log(self, msg: str) -> None:
        if not self.s['quiet']:
            print('[bench %s] %s' % (time.strftime('%H:%M:%S'), msg), file=sys.stderr, flush=True)

    def _input(self, size: Tuple[int, int, int], seed_offset: int = 0) -> torch.Tensor:
        b, h, w = size
        gen = torch.Generator().manual_seed(self.s['seed'] + 1000 + seed_offset)
        return torch.randn(b, 3, h, w, generator=gen).to(self.device)

    # matmul rate ---------------------------------------------------------------------------
    def matmul(self) -> Dict[str, Any]:
        out = {}
        for precision in self.s['precisions']:
            dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
            self.log('matmul rate %d x %d %s' % (self.s['matmul_size'], self.s['matmul_size'], precision))
            out[precision] = matmul_rate(self.s['matmul_size'], self.device, dtype,
                                         self.s['warmup'], self.s['repeats'])
        return out

    # backbones ------------------------------------------------------------------------------
    def backbones(self, mm: Dict[str, Any], compile_reason: Optional[str]) -> List[Dict[str, Any]]:
        rows = []
        for variant in self.s['variants']:
            self.log('building %s (ours and timm\'s, same weights)' % variant)
            ours, plain, ref = build_backbone_pair(variant, self.device, self.s['seed'], self.s['kernels'])
            for size in self.s['sizes']:
                x = self._input(size)
                for precision in self.s['precisions']:
                    rows.extend(self._backbone_size(variant, ours, plain, ref, x, size, precision, mm[precision],
                                                    compile_reason))
            del ours, plain, ref
            gc.collect()
        return rows

    def _backbone_size(self, variant: str, ours: nn.Module, plain: nn.Module, ref: nn.Module, x: torch.Tensor,
                       size: Tuple[int, int, int], precision: str, mm: Dict[str, Any],
                       compile_reason: Optional[str]) -> List[Dict[str, Any]]:
        b, h, w = size
        base = {'variant': variant, 'batch': b, 'height': h, 'width': w, 'precision': precision}
        rows = []
        with torch.inference_mode(), precision_context(precision, self.device):
            flops = count_flops(lambda: plain(x))
            want = ref(x)
            diff, scaled = diffs(ours(x), want)
            exact_diff, exact_scaled = diffs(plain(x), want)
            self.log('%s %dx%dx%d %s eager: %.1f GFLOP per batch, max |ours - timm| %.2e (scaled %.1e; exact '
                     '%.1e)' % (variant, b, h, w, precision, flops / 1e9, diff, scaled, exact_diff))
            t = time_interleaved({'ours': lambda: ours(x), 'timm': lambda: ref(x),
                                  'exact': lambda: plain(x)},
                                 self.s['warmup'], self.s['repeats'], self.device)
            rows.append(dict(base, mode='eager', flops=flops, max_abs_diff=diff, scaled_diff=scaled,
                             ours=dict(_speed(t['ours']['seconds'], b, flops, mm),
                                       all_seconds=t['ours']['all_seconds']),
                             timm=dict(_speed(t['timm']['seconds'], b, flops, mm),
                                       all_seconds=t['timm']['all_seconds']),
                             exact=dict(_speed(t['exact']['seconds'], b, flops, mm),
                                        all_seconds=t['exact']['all_seconds'], max_abs_diff=exact_diff,
                                        scaled_diff=exact_scaled,
                                        ratio=t['timm']['seconds'] / t['exact']['seconds']),
                             ratio=t['timm']['seconds'] / t['ours']['seconds'],
                             ceiling=ceiling_summary(lambda: ours(x), flops, t['ours']['seconds'],
                                                     t['timm']['seconds'], mm, self.device)))
        if not self.s['compile']:
            return rows
        if compile_reason:
            rows.append(dict(base, mode='compiled', error='compile unavailable: ' + compile_reason))
            return rows
        self.log('%s %dx%dx%d %s compiled (%s): compiling both, then timing'
                 % (variant, b, h, w, precision, self.s['compile_backend']))
        try:
            torch._dynamo.reset()
            c_ours = torch.compile(ours, backend=self.s['compile_backend'])
            c_ref = torch.compile(ref, backend=self.s['compile_backend'])
            with torch.inference_mode(), precision_context(precision, self.device), \
                    _inductor_freezing(self.s['freezing'] and self.s['compile_backend'] == 'inductor'):
                t = time_interleaved({'ours': lambda: c_ours(x), 'timm': lambda: c_ref(x)},
                                     max(self.s['warmup'], 1) + 1, self.s['repeats'], self.device)
                diff, scaled = diffs(c_ours(x), ours(x))
        except Exception as e:  # compile problems are results, not crashes
            rows.append(dict(base, mode='compiled', error='compile failed: ' + _short_error(e)))
            return rows
        finally:
            torch._dynamo.reset()
        rows.append(dict(base, mode='compiled', flops=flops, max_abs_diff_vs_eager=diff, scaled_diff_vs_eager=scaled,
                         ours=dict(_speed(t['ours']['seconds'], b, flops, mm),
                                   all_seconds=t['ours']['all_seconds'],
                                   compile_s=t['ours']['first_call_seconds']),
                         timm=dict(_speed(t['timm']['seconds'], b, flops, mm),
                                   all_seconds=t['timm']['all_seconds'],
                                   compile_s=t['timm']['first_call_seconds']),
                         ratio=t['timm']['seconds'] / t['ours']['seconds']))
        return rows

    # segmenters -----------------------------------------------------------------------------
    def segmenters(self, mm: Dict[str, Any]) -> Dict[str, Any]:
        reason = mmseg_reference.unavailable_reason()
        if reason:
            return {'available': False, 'reason': reason, 'results': []}
        rows = []
        b, h, w = size = self.s['segmenter_size']
        x = self._input(size, seed_offset=1)
        for variant in self.s['segmenter_variants']:
            for head in self.s['heads']:
                self.log('segmenter %s %s: building mmseg\'s and ours (converted weights)' % (variant, head))
                try:
                    ref = build_mmseg_segmenter(variant, head, self.device, self.s['seed'])
                    plain = convert_mmseg_segmenter(ref, self.device)
                    ours = optimize(copy.deepcopy(plain), kernels=self.s['kernels'])
                except Exception as e:
                    rows.append({'variant': variant, 'head': head, 'error': 'build failed: ' + _short_error(e)})
                    continue
                metas = [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))] * b
                for precision in self.s['precisions']:
                    with torch.inference_mode(), precision_context(precision, self.device):
                        flops = count_flops(lambda: plain(x))
                        want = ref.encode_decode(x, metas)
                        diff, scaled = diffs(ours(x), want)
                        t = time_interleaved({'ours': lambda: ours(x), 'mmseg': lambda: ref.encode_decode(x, metas)},
                                             self.s['warmup'], self.s['repeats'], self.device)
                        ceiling = ceiling_summary(lambda: ours(x), flops, t['ours']['seconds'],
                                                  t['mmseg']['seconds'], mm[precision], self.device)
                    g = mm[precision]
                    rows.append({'variant': variant, 'head': head, 'batch': b, 'height': h, 'width': w,
                                 'precision': precision, 'flops': flops, 'max_abs_diff': diff, 'scaled_diff': scaled,
                                 'ours': dict(_speed(t['ours']['seconds'], b, flops, g),
                                              all_seconds=t['ours']['all_seconds']),
                                 'mmseg': dict(_speed(t['mmseg']['seconds'], b, flops, g),
                                               all_seconds=t['mmseg']['all_seconds']),
                                 'ratio': t['mmseg']['seconds'] / t['ours']['seconds'], 'ceiling': ceiling})
                del ref, ours, plain
                gc.collect()
        return {'available': True, 'reason': None, 'results': rows}

    # engines --------------------------------------------------------------------------------
    def engines(self) -> Dict[str, Any]:
        """Every engine x dtype on the same models and inputs, timed interleaved (twins_timm.devtools.engine_bench)."""
        models = [(variant, None, self.s['sizes'][0]) for variant in self.s['variants'] if self.s['backbones']]
        models += [(variant, head, self.s['segmenter_size']) for variant in self.s['segmenter_variants']
                   for head in self.s['heads'] if self.s['segmenters']]
        rows = []
        for variant, head, size in models:
            name = variant if head is None else '%s %s' % (head, variant)
            self.log('engines: %s %dx%dx%d' % ((name,) + size))
            model = build_engine_model(variant, head, self.device, self.s['seed'])
            x = self._input(size, seed_offset=2)
            outputs = ['logits'] if head else ['features_%d' % i for i in range(4)]
            with tempfile.TemporaryDirectory(prefix='twins-timm-bench-export-') as tmp:
                runners, engine_rows = prepare_engines(model, x, outputs, Path(tmp), head is not None, self.device,
                                                       self.log, self.s['kernels'])
                with torch.inference_mode():
                    t = time_interleaved({k: (lambda run=run: run(x)) for k, run in runners.items()},
                                         self.s['warmup'], self.s['repeats'], self.device)
            reference = t.get('torch fp32', {}).get('seconds')
            for row in engine_rows:
                timing = t.get('%s %s' % (row['engine'], row['dtype']))
                if timing:
                    row.update(seconds=timing['seconds'], images_per_s=size[0] / timing['seconds'],
                               all_seconds=timing['all_seconds'],
                               speedup=reference / timing['seconds'] if reference else None)
                rows.append(dict({'model': name, 'variant': variant, 'head': head, 'batch': size[0],
                                  'height': size[1], 'width': size[2]}, **row))
            del model, runners
            gc.collect()
        native, why = native_bf16()
        return {'method': ENGINES_METHOD, 'bf16_native': native, 'bf16_note': why, 'results': rows}

    # memory ---------------------------------------------------------------------------------
    def memory(self) -> Dict[str, Any]:
        rows = []
        b, h, w = self.s['memory_size']
        method = METHODS['memory_cuda' if self.device == 'cuda' else 'memory_cpu']
        configs = [(variant, precision) for variant in self.s['memory_variants'] for precision in self.s['precisions']]
        specs = [dict(variant=variant, size=[b, h, w], checkpointing=ckpt, device=self.device, precision=precision,
                      threads=self.s['threads'], seed=self.s['seed'])
                 for variant, precision in configs for ckpt in (False, True)]
        self.log('training memory %s, %dx%dx%d, gradient checkpointing off and on'
                 % (', '.join('%s %s' % c for c in configs), b, h, w))
        if self.device == 'cuda':
            results = []
            for spec in specs:
                try:
                    results.append(measure_training_memory(spec))
                except Exception as e:
                    results.append({'error': _short_error(e)})
        else:
            try:
                results = _memory_in_subprocess(specs)
            except Exception as e:
                results = [{'error': _short_error(e)}] * len(specs)
        for i, (variant, precision) in enumerate(configs):
            peaks = {False: results[2 * i], True: results[2 * i + 1]}
            row = {'variant': variant, 'batch': b, 'height': h, 'width': w, 'precision': precision,
                   'without_checkpointing': peaks[False], 'with_checkpointing': peaks[True]}
            off, on = peaks[False].get('peak_bytes'), peaks[True].get('peak_bytes')
            if off and on:
                row['ratio'] = on / off
            rows.append(row)
        return {'method': method, 'results': rows}

    # all ------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        torch.set_num_threads(self.s['threads'])
        started = time.time()
        out: Dict[str, Any] = {'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started)),
                               'machine': machine_info(self.s), 'settings': _json_settings(self.s),
                               'methods': METHODS}
        out['matmul'] = mm = self.matmul()
        compile_reason = compile_unavailable_reason(self.device, self.s['compile_backend']) \
            if self.s['compile'] else 'skipped (--no-compile, or --quick without --compile)'
        out['compile'] = {'available': compile_reason is None, 'reason': compile_reason,
                          'backend': self.s['compile_backend']}
        out['backbones'] = self.backbones(mm, compile_reason if self.s['compile'] else None) \
            if self.s['backbones'] else []
        out['segmenters'] = self.segmenters(mm) if self.s['segmenters'] else \
            {'available': False, 'reason': 'skipped (--no-segmenters)', 'results': []}
        out['engines'] = self.engines() if self.s['engines'] else \
            {'method': None, 'reason': 'skipped (no --engines)', 'results': []}
        out['memory'] = self.memory() if self.s['memory'] else \
            {'method': None, 'reason': 'skipped (--no-memory)', 'results': []}
        out['kernels'] = kernel_summary(self.s['kernels'])
        out['total_seconds'] = time.time() - started
        return out


def _json_settings(s: Dict[str, Any]) -> Dict[str, Any]:
    d = dict(s)
    d['sizes'] = ['%dx%dx%d' % t for t in s['sizes']]
    for k in ('segmenter_size', 'memory_size'):
        d[k] = '%dx%dx%d' % s[k]
    d['kernels'] = s['kernels'].policy  # a saved table's choices are under 'kernels' in the results
    return d


def machine_info(s: Dict[str, Any]) -> Dict[str, Any]:
    import timm
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    info = {'cpu': cpu, 'cores_available': _available_cores(), 'threads': s['threads'],
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'platform': platform.platform(), 'device': s['device']}
    if s['device'] == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    return info


# ------------------------------------------------------------------------------------- memory
def measure_training_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One forward + backward of our backbone; peak bytes above the state after model creation."""
    import timm

    import twins_timm  # noqa: F401
    torch.set_num_threads(int(spec['threads']))
    device = spec['device']
    b, h, w = spec['size']
    model = _materialize(lambda: timm.create_model(spec['variant'], pretrained=False, num_classes=0),
                         device, int(spec['seed'])).train()
    model.set_grad_checkpointing(bool(spec['checkpointing']))
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        gc.collect()
        base = _reset_peak_rss()
    with precision_context(spec['precision'], device):
        feats = model.forward_intermediates(x, intermediates_only=True)
        loss = sum(f.float().mean() for f in feats)
    loss.backward()
    if device == 'cuda':
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _peak_rss()
    return {'peak_bytes': peak - base, 'baseline_bytes': base}


def _proc_status_bytes(field: str) -> Optional[int]:
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> int:
    """Reset the process's RSS high-water mark where Linux allows it; the baseline in bytes.

    Writing 5 to /proc/self/clear_refs sets VmHWM to the current RSS, so transient peaks of imports and
    model creation drop out; elsewhere the baseline is ru_maxrss (the peak so far), which can hide small
    activations under an earlier transient.
    """
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        rss = _proc_status_bytes('VmRSS')
        if rss is not None and _proc_status_bytes('VmHWM') is not None:
            return rss
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _peak_rss() -> int:
    hwm = _proc_status_bytes('VmHWM')
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_in_fresh_processes(specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """:func:`measure_training_memory` of each spec in a process of its own, forked from this one (which has
    imported torch and timm and computed nothing, so no thread pool is inherited). Without os.fork this
    process is itself the fresh one, given one spec."""
    import timm  # noqa: F401  imported once, before the forks

    import twins_timm  # noqa: F401
    if not hasattr(os, 'fork'):
        return [measure_training_memory(spec) for spec in specs]
    results = []
    for spec in specs:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, report, leave without running the parent's clean-up
            os.close(read)
            try:
                out = measure_training_memory(spec)
            except BaseException as e:
                out = {'error': _short_error(e)}
            with os.fdopen(write, 'w') as f:
                f.write(json.dumps(out))
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as f:
            text = f.read()
        _, status = os.waitpid(pid, 0)
        results.append(json.loads(text) if text else
                       {'error': 'memory process ended with status %d and no result' % status})
    return results


def _memory_in_subprocess(specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """CPU peak RSS is per process, so every configuration gets a fresh one: one subprocess imports torch and
    timm once and forks a child per configuration (:func:`measure_in_fresh_processes`); without os.fork, a
    subprocess per configuration."""
    if not hasattr(os, 'fork') and len(specs) > 1:
        return [result for spec in specs for result in _memory_in_subprocess([spec])]
    code = ('import json, sys; from twins_timm.devtools.bench import measure_in_fresh_processes; '
            'print("RESULT " + json.dumps(measure_in_fresh_processes(json.loads(sys.argv[1]))))')
    # A fixed mmap threshold makes glibc hand every large block straight back to the OS when it is freed,
    # so RSS follows the live tensors instead of the allocator's free lists.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    proc = subprocess.run([sys.executable, '-c', code, json.dumps(specs)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith('RESULT '):
            return json.loads(line[len('RESULT '):])
    tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
    raise RuntimeError('memory subprocess exited with %d: %s' % (proc.returncode, tail))


def build_engine_model(variant: str, head: Optional[str], device: str, seed: int, **backbone_args: Any) -> nn.Module:
    """Our backbone (features_only semantics) or segmenter (mmseg's ADE20K options), seeded weights, eval.

    ``backbone_args`` change the backbone (the tests' shallow ``depths``).
    """
    import timm

    from twins_timm.adapters import TwinsFPN, TwinsUPerNet
    from twins_timm.models.twins import checkpoint_family_args
    if head is None:
        return Intermediates(_materialize(lambda: timm.create_model(variant, pretrained=False, **backbone_args),
                                          device, seed)).eval()
    cls = {'fpn': TwinsFPN, 'upernet': TwinsUPerNet}[head]
    args = dict(checkpoint_family_args('mmseg', variant), **backbone_args)
    return _materialize(lambda: cls(encoder_name=variant, classes=150, aux_head=False, encoder_args=args),
                        device, seed)


# ------------------------------------------------------------------------------------- mmseg
def build_mmseg_segmenter(variant: str, head: str, device: str, seed: int) -> nn.Module:
    """mmseg's own ADE20K Twins EncoderDecoder (SyncBN -> BN, no downloads), seeded weights, eval."""
    return seeded_fill_(mmseg_reference.build_segmenter(variant, head), seed).to(device).eval()


def convert_mmseg_segmenter(mmseg_model: nn.Module, device: str) -> nn.Module:
    """Our segmenter with the mmseg model's weights, through the package's converter."""
    from twins_timm.convert import build_model, convert_checkpoint
    sd = {k: v.detach().clone().cpu() for k, v in mmseg_model.state_dict().items()}
    res = convert_checkpoint({'meta': {'mmseg_version': '1.2.2'}, 'state_dict': sd})
    return build_model(res, device=device).eval()


# ------------------------------------------------------------------------------------ kernels
def kernel_summary(table: KernelTable) -> Dict[str, Any]:
    """Which kernel each layer family of ours took in this run, with the GFLOP/s measured per shape."""
    shapes = table.report()
    summary = {}
    for r in shapes:
        fam = summary.setdefault(r['family'], {'shapes': 0, 'chosen': {}, 'gflops': {}})
        fam['shapes'] += 1
        fam['chosen'][r['choice']] = fam['chosen'].get(r['choice'], 0) + 1
        for k, v in r['gflops'].items():
            fam['gflops'].setdefault(k, []).append(v)
    for fam in summary.values():
        fam['gflops'] = {k: {'min': min(v), 'median': statistics.median(v), 'max': max(v)}
                         for k, v in fam['gflops'].items()}
    return {'policy': table.policy, 'families': summary, 'choices': dict(table.choices),
            'shapes': [dict(r, shape=list(r['shape'])) for r in shapes]}


# -------------------------------------------------------------------------------------- output
def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned columns: text left, numbers right."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [any(_is_number(row[i]) for row in rows) and all(_is_number(row[i]) or row[i] is None for row in rows)
               for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append('  '.join(c.rjust(wd) if numeric[i] else c.ljust(wd) for i, (c, wd) in
                               enumerate(zip(row, widths))).rstrip())
        if n == 0:
            lines.append('  '.join('-' * wd for wd in widths))
    return '\n'.join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return '%.3g' % v if abs(v) < 0.01 else ('%.2f' % v if abs(v) < 100 else '%.0f' % v)
    return '-' if v is None else str(v)


def render(out: Dict[str, Any]) -> str:
    m = out['machine']
    parts = ['twins-timm bench: %s, %d thread(s), device %s, torch %s, timm %s'
             % (m['cpu'], m['threads'], m['device'], m['torch'], m['timm'])]
    for prec, r in out['matmul'].items():
        line = 'matmul rate (%s, %d x %d): %.1f GFLOP/s' % (prec, r['n'], r['n'], r['gflops'])
        if r.get('onednn_gflops'):
            line += '; the same product through oneDNN (our inference linear): %.1f GFLOP/s' % r['onednn_gflops']
        parts.append(line)
    rows = []
    for r in out['backbones']:
        size = '%dx%dx%d' % (r['batch'], r['height'], r['width'])
        if 'error' in r:
            rows.append([r['variant'], size, r['precision'], r['mode']] + [None] * 11 + [r['error']])
            continue
        exact, ceiling = r.get('exact', {}), r.get('ceiling') or {}
        rows.append([r['variant'], size, r['precision'], r['mode'], r['ours']['images_per_s'],
                     r['timm']['images_per_s'], r['ratio'], exact.get('ratio'), r['ours']['gflops'],
                     r['ours']['pct_matmul'], r['timm']['pct_matmul'], r['ours'].get('pct_gemm'),
                     ceiling.get('pct_gemm'), ceiling.get('ratio'),
                     '%.1e' % r.get('max_abs_diff', r.get('max_abs_diff_vs_eager', 0.0)),
                     '%.1e' % r.get('scaled_diff', r.get('scaled_diff_vs_eager', 0.0))])
    if rows:
        parts += ['', "Backbones, ours vs timm's Twins (features_only, eval, inference mode; compiled: diff vs "
                      "our eager; exact: ours with F.linear, bit-identical to timm; %s)" % CEILING_LEGEND,
                  format_table(['variant', 'BxHxW', 'prec', 'mode', 'ours img/s', 'timm img/s', 'ratio',
                                'exact ratio', 'ours GFLOP/s', 'ours %mm', 'timm %mm', 'ours %gemm', 'ceiling %gemm',
                                'ceiling ratio', 'max|diff|', 'scaled'], rows)]
    seg = out['segmenters']
    parts.append('')
    if not seg['available']:
        parts.append("Segmenters vs mmseg: not measured (%s)" % seg['reason'])
    else:
        rows = []
        for r in seg['results']:
            if 'error' in r:
                rows.append([r['variant'], r['head']] + [None] * 10 + [r['error']])
                continue
            ceiling = r.get('ceiling') or {}
            rows.append([r['variant'], r['head'], '%dx%dx%d' % (r['batch'], r['height'], r['width']),
                         r['precision'], r['ours']['images_per_s'], r['mmseg']['images_per_s'], r['ratio'],
                         r['ours']['pct_matmul'], r['ours'].get('pct_gemm'), ceiling.get('pct_gemm'),
                         ceiling.get('ratio'), '%.1e' % r['max_abs_diff'],
                         '%.1e' % r.get('scaled_diff', 0.0)])
        parts += ["Segmenters, ours vs mmseg's own models (end to end, eval; %s)" % CEILING_LEGEND,
                  format_table(['variant', 'head', 'BxHxW', 'prec', 'ours img/s', 'mmseg img/s', 'ratio',
                                'ours %mm', 'ours %gemm', 'ceiling %gemm', 'ceiling ratio', 'max|diff|', 'scaled'],
                               rows)]
    parts += render_engines(out.get('engines') or {})
    mem = out['memory']
    parts.append('')
    if not mem['results']:
        parts.append('Training memory: not measured (%s)' % mem.get('reason'))
    else:
        rows = []
        for r in mem['results']:
            off, on = r['without_checkpointing'], r['with_checkpointing']
            rows.append([r['variant'], '%dx%dx%d' % (r['batch'], r['height'], r['width']), r['precision'],
                         _mib(off), _mib(on), r.get('ratio'), off.get('error') or on.get('error')])
        parts += ['Peak training memory (forward + backward), MiB above the model and input',
                  textwrap.fill('method: ' + mem['method'], 110, subsequent_indent='  '),
                  format_table(['variant', 'BxHxW', 'prec', 'no ckpt', 'ckpt', 'ratio', 'error'], rows)]
    ker = out.get('kernels') or {}
    if ker.get('families'):
        rows = []
        for name, fam in sorted(ker['families'].items()):
            g = fam['gflops']
            other = next((k for k in g if k != 'plain'), '-')  # onednn, rows (MLP) or winograd (3x3 convs)
            rows.append([name, fam['shapes'], fam['chosen'].get('plain', 0), other, fam['chosen'].get(other, 0),
                         g.get('plain', {}).get('median'), g.get(other, {}).get('median'),
                         g.get('plain', {}).get('max'), g.get(other, {}).get('max')])
        parts += ['', 'Kernels our layers took (CPU inference calibration, per layer shape; GFLOP/s measured '
                      "there, all shapes in the JSON; other = oneDNN kernel, the MLP's row chunks or a "
                      'Winograd 3x3 conv)',
                  format_table(['family', 'shapes', 'took plain', 'other kernel', 'took other', 'plain median',
                                'other median', 'plain max', 'other max'], rows)]
    parts.append('')
    return '\n'.join(parts)


def render_engines(eng: Dict[str, Any]) -> List[str]:
    """The engines table: speed-up over torch fp32, export and first-call times, parity."""
    if not eng.get('results'):
        return []
    rows = []
    for r in eng['results']:
        agree = r.get('argmax_agreement')
        rows.append([r['model'], '%dx%dx%d' % (r['batch'], r['height'], r['width']), r['engine'], r['dtype'],
                     r.get('images_per_s'), r.get('speedup'), r.get('export_seconds'), r.get('convert_seconds'),
                     r.get('first_call_seconds'),
                     '%.1e' % r['scaled_diff'] if 'scaled_diff' in r else None,
                     '%.2f%%' % (100 * agree) if agree is not None else None,
                     (r.get('skipped') or r.get('error') or '')[:100] or None])
    return ['', 'CPU inference engines, each against torch fp32 on the same input (speed-up: torch fp32 time over '
                'the engine\'s; export, OpenVINO conversion and first call in s; bf16 native: %s)'
            % eng.get('bf16_note'),
            format_table(['model', 'BxHxW', 'engine', 'dtype', 'img/s', 'speed-up', 'export s', 'convert s',
                          'first call s', 'scaled diff', 'argmax agree', 'note'], rows)]


def _mib(d: Dict[str, Any]) -> Optional[float]:
    return d['peak_bytes'] / 2 ** 20 if 'peak_bytes' in d else None


def write_json(path: Path, data: Dict[str, Any], force: bool) -> None:
    """Atomic write (temp file + rename) through the project's one implementation."""
    from twins_timm.convert.io import atomic_path
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + '\n')


def run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    out = Bench(settings).run()
    print(render(out))
    write_json(Path(settings['json']), out, force=args.force)
    print('results written to %s' % settings['json'])
    return 0


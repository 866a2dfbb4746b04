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
import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

from twins_timm.adapters.hub import HEADS
from twins_timm.devtools.bench import Bench, available_cores
from twins_timm.devtools.bench_render import render
from twins_timm.files.atomic import atomic_path
from twins_timm.files.paths import check_output_file
from twins_timm.inference.devices import pick_device
from twins_timm.models.twins import VARIANTS

DESCRIPTION = __doc__
EPILOG = """examples:
  twins-timm bench --quick                      # S variants, 2x512x512, a few minutes on 2 cores
  twins-timm bench --json bench.json --force    # everything: six variants, two sizes (long)
  twins-timm bench --variants twins_svt_small --sizes 2x512x512,32x224x224 --no-segmenters
  twins-timm bench --no-backbones --no-memory --repeats 3   # segmenters vs mmseg only
  twins-timm bench --threads 2 --repeats 5 --no-compile --no-memory
  twins-timm bench --quick --engines --no-memory   # + torch / ONNX Runtime / OpenVINO, fp32 and bf16
"""

QUICK_VARIANTS = ('twins_pcpvt_small', 'twins_svt_small')
DEFAULT_SIZES = '2x512x512,32x224x224'
QUICK_SIZES = '2x512x512'
DEFAULT_JSON = 'twins-timm-bench.json'


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
    parser.add_argument('--no-mmseg', action='store_true',
                        help="leave out the comparison with mmseg's segmenters (the segmenters still run under "
                             '--engines): for the large variants, where it costs minutes')
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
    device = str(pick_device(args.device))
    if device not in ('cpu', 'cuda'):
        raise ValueError("--device %s: the bench runs on 'cpu', 'cuda' or 'auto'" % args.device)
    threads = args.threads if args.threads is not None else available_cores()
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
        backbones=not args.no_backbones, segmenters=not args.no_segmenters, mmseg=not args.no_mmseg,
        segmenter_size=parse_size(args.segmenter_size or ('1x512x512' if quick else '2x512x512')),
        engines=bool(args.engines),
        memory=not args.no_memory, memory_size=parse_size(args.memory_size),
        memory_variants=variants[:1] if quick and not args.variants else variants,
        segmenter_variants=variants[:1] if quick and not args.variants else variants,
        precisions=['fp32'] + (['bf16'] if device == 'cuda' else []),
        json=str(json_path), seed=args.seed, quiet=bool(args.quiet),
    )


def write_json(path: Path, data: Dict[str, Any], force: bool) -> None:
    """Atomic write (temp file + rename) through the project's one implementation."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + '\n')


def run(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)  # every check before minutes of measuring
    out = Bench(settings).run()
    print(render(out))
    write_json(Path(settings['json']), out, force=args.force)
    print('results written to %s' % settings['json'])
    return 0

"""Each ``twins_timm.optimize`` trick measured end to end against the optimized model without it.

    python -m twins_timm.devtools.ablation --json ablation.json
    python -m twins_timm.devtools.ablation_report ablation.json      # Markdown for docs/benchmarks.md

For FPN and UPerNet on PCPVT-S and SVT-S (1x3x512x512 fp32 by default), one run times, interleaved
(A B C ... A B C ...) on the same seeded weights and input: the plain model, ``optimize(model)`` with
every trick, and ``optimize`` minus each trick in turn. A trick's gain is (time without it) / (time with
all) - 1; it keeps its place where that clears 5 %. The private torch API on the path (the global-hooks
read) is reported with its cost per forward. Nothing here is a user-facing switch: a trick is switched
off by putting its layer class back to the plain one after ``optimize``; everything else stays as
``optimize`` made it.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
from torch import nn
from tqdm import tqdm

from twins_timm.files.atomic import atomic_path
from twins_timm.devtools.ablation_report import KIND, render_run
from twins_timm.devtools.bench import machine_info
from twins_timm.devtools.bench_models import build_engine_model
from twins_timm.devtools.bench_timing import time_interleaved
from twins_timm.files.paths import check_output_file
from twins_timm.inference.numerics import scaled_diff
from twins_timm.optimize import decoders, guards, layers, optimize

THRESHOLD_PCT = 5.0  # a trick stays only if the model without it is at least this much slower
DEFAULT_VARIANTS = ('twins_pcpvt_small', 'twins_svt_small')
HEADS = ('fpn', 'upernet')
DEFAULT_SIZE = '1x512x512'
DEFAULT_JSON = 'twins-timm-ablation.json'
CPU_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'amx_tile', 'amx_bf16')
PLAIN_CLASS = {fast: plain for plain, fast in decoders.SWAPS.items()}
PLAIN_CLASS[layers.InplaceGELU] = nn.GELU


@dataclass(frozen=True)
class Trick:
    """One removable speed-up: layer classes left plain."""
    what: str
    classes: Tuple[type, ...] = ()  # swapped-in classes put back to the plain ones when switched off


TRICKS: Dict[str, Trick] = {
    'in-place-gelu': Trick("the MLP's GELU in place (InplaceGELU, torch.ops.aten.gelu_)",
                           classes=(layers.InplaceGELU,)),
    'fused-pyramid-conv': Trick("UPerHead's fusion conv per pyramid level (upsampled_conv3x3)",
                                classes=(decoders.FastUPerNetDecoder,)),
}

METHOD = ('median of --repeats rounds after --warmup rounds, every model of one segmenter interleaved in each '
          'round; gain = seconds without the trick / seconds with all - 1')
PRIVATE_APIS = {
    'torch.nn.modules.module._global_forward_hooks, _global_forward_pre_hooks': {
        'where': 'guards.has_hooks',
        'public': 'none: torch has no public reader of global hooks; a correctness check (global hooks see '
                  'whole tensors), not a speed-up: its figure is its cost per forward'},
}


# ------------------------------------------------------------------------------ one trick off
def without(plain: nn.Module, trick: Optional[str]) -> nn.Module:
    """A copy of ``plain`` optimized as ``optimize(model)`` does, but for ``trick`` (None: every trick)."""
    off = TRICKS[trick] if trick is not None else Trick('')
    model = optimize(copy.deepcopy(plain))
    for module in model.modules():
        if type(module) in off.classes:
            module.__class__ = PLAIN_CLASS[type(module)]
    return model


def absent_because(trick: str, full: nn.Module) -> Optional[str]:
    """Why switching ``trick`` off would change nothing in ``full``, or None."""
    if not any(type(m) in TRICKS[trick].classes for m in full.modules()):
        return 'not in this model'
    return None


# ------------------------------------------------------------------------------------ measuring
def gain_pct(seconds_without: float, seconds_all: float) -> float:
    return 100.0 * (seconds_without / seconds_all - 1.0)


def _timed(fns: Dict[str, Callable[[], Any]], s: Dict[str, Any], desc: str) -> Dict[str, Dict[str, Any]]:
    """``time_interleaved`` with a progress bar on stderr, one step per call."""
    with tqdm(total=len(fns) * (s['warmup'] + s['repeats']), desc=desc, unit='call', file=sys.stderr,
              disable=s['quiet']) as bar:
        def stepping(fn: Callable[[], Any]) -> Callable[[], Any]:
            def call() -> Any:
                out = fn()
                bar.update(1)
                return out
            return call
        return time_interleaved({k: stepping(fn) for k, fn in fns.items()}, s['warmup'], s['repeats'], 'cpu')


def _trick_rows(names: Sequence[str], skipped: Dict[str, str], t: Dict[str, Dict[str, Any]],
                diffs: Dict[str, float], all_key: str) -> Dict[str, Dict[str, Any]]:
    rows: Dict[str, Dict[str, Any]] = {}
    for name in names:
        if name in skipped:
            rows[name] = {'skipped': skipped[name]}
            continue
        gain = gain_pct(t[name]['seconds'], t[all_key]['seconds'])
        rows[name] = {'seconds': t[name]['seconds'], 'all_seconds': t[name]['all_seconds'], 'gain_pct': gain,
                      'clears_threshold': gain >= THRESHOLD_PCT, 'scaled_diff_vs_plain': diffs.get(name)}
    return rows


def measure_eager(plain: nn.Module, x: torch.Tensor, s: Dict[str, Any], desc: str) -> Dict[str, Any]:
    """Plain, every trick, and every trick but one, interleaved; per trick the gain or why it was skipped."""
    with torch.inference_mode():
        full = without(plain, None)
        want = plain(x)
        got_full = full(x)
        skipped = {n: r for n in s['tricks'] if (r := absent_because(n, full)) is not None}
        models = {'plain': plain, 'all': full}
        for name in s['tricks']:
            if name not in skipped:
                models[name] = without(plain, name)
        diffs = {name: scaled_diff(m(x), want) for name, m in models.items() if name != 'plain'}
        diffs['all'] = scaled_diff(got_full, want)
        t = _timed({name: (lambda m=m: m(x)) for name, m in models.items()}, s, desc)
    return {'plain_seconds': t['plain']['seconds'], 'all_seconds': t['all']['seconds'],
            'speedup_all_over_plain': t['plain']['seconds'] / t['all']['seconds'],
            'scaled_diff_all_vs_plain': diffs['all'],
            'tricks': _trick_rows(s['tricks'], skipped, t, diffs, 'all'),
            'has_hooks_per_forward': _has_hooks_cost(full, x)}


def _has_hooks_cost(model: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """How often one forward asks ``guards.has_hooks`` (the private global-hooks read), and for how long."""
    calls: List[float] = []
    original = guards.has_hooks

    def timed(*modules: nn.Module) -> bool:
        started = time.perf_counter()
        answer = original(*modules)
        calls.append(time.perf_counter() - started)
        return answer
    guards.has_hooks = timed
    try:
        with torch.inference_mode():
            model(x)
    finally:
        guards.has_hooks = original
    return {'calls': len(calls), 'seconds': sum(calls)}


def private_api_rows(models: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each private torch API on the optimize path: its public alternative and the figure measured per model."""
    rows = []
    for api, info in PRIVATE_APIS.items():
        figures = {}
        for m in models:
            cost = m['eager']['has_hooks_per_forward']
            figures['%s %s' % (m['head'], m['variant'])] = '%d calls, %.2g %% of a forward' % (
                cost['calls'], 100 * cost['seconds'] / m['eager']['all_seconds'])
        rows.append(dict(info, api=api, figures=figures))
    return rows


# ----------------------------------------------------------------------------------- the run
def cpu_flags() -> List[str]:
    """The CPU flags that decide which kernels win (AVX-512, VNNI, bf16, AMX)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                present = set(line.split(':', 1)[1].split())
                return [f for f in CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def run_ablation(s: Dict[str, Any], **encoder_args: Any) -> Dict[str, Any]:
    """Every (head, variant) of the settings. ``encoder_args``: tests' shallow backbones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(s['threads'])
    try:
        return _run_ablation(s, **encoder_args)
    finally:
        torch.set_num_threads(threads)  # a caller's setting (the tests') back


def _run_ablation(s: Dict[str, Any], **encoder_args: Any) -> Dict[str, Any]:
    started = time.time()
    out: Dict[str, Any] = {
        'kind': KIND, 'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started)),
        'machine': dict(machine_info(dict(s, device='cpu')), cpu_flags=cpu_flags()),
        'settings': dict({k: v for k, v in s.items() if k != 'quiet'}, size='%dx%dx%d' % s['size']),
        'method': METHOD, 'threshold_pct': THRESHOLD_PCT,
        'tricks': {n: {'what': t.what} for n, t in TRICKS.items() if n in s['tricks']}, 'models': []}
    b, h, w = s['size']
    x = torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(s['seed'] + 1000))
    for head in s['heads']:
        for variant in s['variants']:
            desc = '%s %s' % (head, variant)
            plain = build_engine_model(variant, head, 'cpu', s['seed'], **encoder_args)
            out['models'].append({'head': head, 'variant': variant, 'batch': b, 'height': h, 'width': w,
                                  'eager': measure_eager(plain, x, s, desc)})
            del plain
    out['private_apis'] = private_api_rows(out['models'])
    out['total_seconds'] = time.time() - started
    return out


# ---------------------------------------------------------------------------------------- CLI
def _split(text: str) -> List[str]:
    return [t.strip() for t in text.split(',') if t.strip()]


def _not_an_ablation(path: Path) -> Optional[str]:
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return 'not a JSON file'
    return None if isinstance(data, dict) and data.get('kind') == KIND else 'not an ablation result'


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m twins_timm.devtools.ablation', description=__doc__.split('\n\n')[0],
                                epilog='takes ~10 min on 2 cores with the defaults; a quiet machine is needed')
    p.add_argument('--variants', default=','.join(DEFAULT_VARIANTS), help='comma-separated (default: %(default)s)')
    p.add_argument('--heads', default=','.join(HEADS), help='comma-separated fpn, upernet (default: %(default)s)')
    p.add_argument('--size', default=DEFAULT_SIZE, help='BATCHxHEIGHTxWIDTH (default: %(default)s)')
    p.add_argument('--tricks', default=','.join(TRICKS), help='tricks to switch off (default: all)')
    p.add_argument('--repeats', type=int, default=5, help='timed interleaved rounds (default: %(default)s)')
    p.add_argument('--warmup', type=int, default=1, help='rounds before timing, >= 1 (default: %(default)s)')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: the cores available)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=DEFAULT_JSON, help='results file (default: %(default)s)')
    p.add_argument('--force', action='store_true', help='replace an earlier ablation result at --json')
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    return p.parse_args(argv)


def parse_size(text: str) -> Tuple[int, int, int]:
    """'1x512x512' -> (1, 512, 512)."""
    try:
        b, h, w = (int(p) for p in text.lower().split('x'))
    except ValueError:
        raise ValueError('--size %r is not BATCHxHEIGHTxWIDTH, e.g. 1x512x512' % text) from None
    if b < 1 or h < 32 or w < 32:
        raise ValueError('--size %r: batch must be >= 1 and height, width >= 32' % text)
    return b, h, w


def _variant_known(variant: str) -> bool:
    return variant.startswith(('twins_pcpvt_', 'twins_svt_')) and timm.is_model(variant)


def resolve_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Every argument checked before the first model is built."""
    variants, heads, tricks = _split(args.variants), _split(args.heads), _split(args.tricks)
    bad = [v for v in variants if not _variant_known(v)] + [h for h in heads if h not in HEADS] + \
        [t for t in tricks if t not in TRICKS]
    if bad or not variants or not heads:
        raise ValueError('unknown or missing %s; variants: twins_pcpvt_* / twins_svt_* (small, base, large); heads: '
                         '%s; tricks: %s' % (', '.join(bad) or 'variants / heads', ', '.join(HEADS),
                                             ', '.join(TRICKS)))
    if args.repeats < 1 or args.warmup < 1:
        raise ValueError('--repeats and --warmup must be >= 1')
    threads = args.threads or len(os.sched_getaffinity(0))
    if threads < 1:
        raise ValueError('--threads must be >= 1')
    check_output_file(Path(args.json), '--json', force=args.force, not_ours=_not_an_ablation)
    return dict(variants=variants, heads=heads, size=parse_size(args.size), tricks=tricks, repeats=args.repeats,
                warmup=args.warmup, threads=threads, seed=args.seed, json=args.json, quiet=args.quiet)


def write_json(path: Path, data: Dict[str, Any], force: bool) -> None:
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + '\n')


def main(argv: Optional[Sequence[str]] = None, **encoder_args: Any) -> int:
    args = parse_args(argv)
    try:
        settings = resolve_settings(args)
    except (ValueError, OSError) as e:
        print('ablation: error: %s' % e, file=sys.stderr)
        return 2
    out = run_ablation(settings, **encoder_args)
    print(render_run(out, settings['json']))
    write_json(Path(settings['json']), out, force=args.force)
    print('results written to %s' % settings['json'])
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""The benchmark instrument behind `twins-timm bench`: ours vs timm's Twins and mmseg's segmenters.

``Bench(settings).run()`` measures every section the settings ask for and returns one JSON-ready dict
(the machine, the settings, the method of each measurement, the results); `twins_timm.commands.bench`
checks the request and builds the settings, :mod:`twins_timm.devtools.bench_render` prints the tables.
How it measures is in :mod:`~twins_timm.devtools.bench_timing` and
:mod:`~twins_timm.devtools.bench_memory`, what it measures in :mod:`~twins_timm.devtools.bench_models`.
"""
from __future__ import annotations

import copy
import gc
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
from torch import nn

from twins_timm.deploy.engines import native_bf16
from twins_timm.devtools import mmseg_reference
from twins_timm.devtools.bench_memory import measure_training_memory, memory_in_subprocess
from twins_timm.devtools.bench_models import (build_backbone_pair, build_engine_model, build_mmseg_segmenter,
                                              convert_mmseg_segmenter)
from twins_timm.devtools.bench_timing import (ceiling_summary, compile_unavailable_reason, count_flops, diffs,
                                              inductor_freezing, matmul_rate, precision_context, short_error,
                                              speed, time_interleaved)
from twins_timm.devtools.engine_bench import METHOD as ENGINES_METHOD
from twins_timm.devtools.engine_bench import prepare_engines
from twins_timm.optimize import optimize

METHODS = {
    'timing': 'warm-up runs, then the median of --repeats runs; the compared models run interleaved '
              '(A B A B ...) on the same input so that machine noise hits both alike',
    'backbone': 'features_only semantics: forward_intermediates(x, intermediates_only=True) -> 4 NCHW maps; '
                'eval, torch.inference_mode(); our seeded random weights loaded strictly into '
                "timm's own timm.models.twins.Twins",
    'flops': 'torch.utils.flop_counter.FlopCounterMode over one forward of our model per input on its plain '
             'path (the plain model, before twins_timm.optimize: the work timm / mmseg do for the same function; matmuls, convolutions '
             'and attention; 2 FLOPs per multiply-add); the same count is used for the reference, so GFLOP/s '
             "compare work done. Our inference shortcut that does less work (UPerHead's fused bottleneck) "
             'shows as an effective rate, which can pass 100 % of the matmul rate',
    'matmul_rate': 'N x N @ N x N matmul (2 N^3 FLOPs) in the benchmark dtype, median of repeats, '
                   'measured in the same run; pct_matmul = model GFLOP/s / matmul GFLOP/s. On CPU the same '
                   "product is also timed through oneDNN (a 1x1 convolution; on some CPUs oneDNN's GEMM outruns "
                   "torch.mm's): onednn_gflops; pct_gemm = model GFLOP/s / the faster of the two",
    'ceiling': 'the speed ceiling of our model (twins_timm.devtools.speed_ceiling): one eager forward recorded op by '
               'op, then every matrix product (linear, matmul, mm / bmm, convolution, attention) and every other op '
               'no implementation can skip or fold into a product (LayerNorm, softmax, resizes) replayed alone on '
               'fresh inputs of the same shapes and strides, two warm-up runs, then the best of 5; their sum is the '
               'time the forward would take if nothing else took time (product_seconds + other_seconds). pct_gemm: '
               'the model FLOPs over that time, against the best matmul rate (about the most our % of best GEMM '
               'can be); outside_share: the part of our measured time spent outside those ops; ratio: the '
               "reference's time over the ceiling (about the most our speed-up can be without faster kernels). "
               'A measurement, not a proof: each replay pays its own memory costs. ops: every distinct call',
    'exact': "our plain model (timm.create_model, without twins_timm.optimize): timm's Twins, bit-identical "
             'to it. Timed in the same interleaved rounds',
    'diff': 'max_abs_diff = max |ours - reference| over all outputs; scaled_diff divides each output\'s by '
            'max(1, max |reference|)',
    'compile': "torch.compile(model) (default mode, backend --compile-backend) of both models, with inductor's "
               'freezing (weights as constants, prepacked) unless --no-freezing; compiled, ours runs its plain '
               'forward (the optimize paths are eager-only); compilation happens in the warm-up and is reported separately as compile_s',
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


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------- the sections
class Bench:
    """One benchmark run: each section a method, so a test (or a notebook) can run one section alone."""

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
            ours, plain, ref = build_backbone_pair(variant, self.device, self.s['seed'])
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
                             ours=dict(speed(t['ours']['seconds'], b, flops, mm),
                                       all_seconds=t['ours']['all_seconds']),
                             timm=dict(speed(t['timm']['seconds'], b, flops, mm),
                                       all_seconds=t['timm']['all_seconds']),
                             exact=dict(speed(t['exact']['seconds'], b, flops, mm),
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
                    inductor_freezing(self.s['freezing'] and self.s['compile_backend'] == 'inductor'):
                t = time_interleaved({'ours': lambda: c_ours(x), 'timm': lambda: c_ref(x)},
                                     max(self.s['warmup'], 1) + 1, self.s['repeats'], self.device)
                diff, scaled = diffs(c_ours(x), ours(x))
        except Exception as e:  # compile problems are results, not crashes
            rows.append(dict(base, mode='compiled', error='compile failed: ' + short_error(e)))
            return rows
        finally:
            torch._dynamo.reset()
        rows.append(dict(base, mode='compiled', flops=flops, max_abs_diff_vs_eager=diff, scaled_diff_vs_eager=scaled,
                         ours=dict(speed(t['ours']['seconds'], b, flops, mm),
                                   all_seconds=t['ours']['all_seconds'],
                                   compile_s=t['ours']['first_call_seconds']),
                         timm=dict(speed(t['timm']['seconds'], b, flops, mm),
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
                    ours = optimize(copy.deepcopy(plain))
                except Exception as e:
                    rows.append({'variant': variant, 'head': head, 'error': 'build failed: ' + short_error(e)})
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
                                 'ours': dict(speed(t['ours']['seconds'], b, flops, g),
                                              all_seconds=t['ours']['all_seconds']),
                                 'mmseg': dict(speed(t['mmseg']['seconds'], b, flops, g),
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
                                                       self.log)
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
                    results.append({'error': short_error(e)})
        else:
            try:
                results = memory_in_subprocess(specs)
            except Exception as e:
                results = [{'error': short_error(e)}] * len(specs)
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
        out['segmenters'] = self.segmenters(mm) if self.s['segmenters'] and self.s.get('mmseg', True) else \
            {'available': False, 'reason': 'skipped (%s)' % ('--no-segmenters' if not self.s['segmenters'] else
                                                             '--no-mmseg'), 'results': []}
        out['engines'] = self.engines() if self.s['engines'] else \
            {'method': None, 'reason': 'skipped (no --engines)', 'results': []}
        out['memory'] = self.memory() if self.s['memory'] else \
            {'method': None, 'reason': 'skipped (--no-memory)', 'results': []}
        out['total_seconds'] = time.time() - started
        return out


def _json_settings(s: Dict[str, Any]) -> Dict[str, Any]:
    d = dict(s)
    d['sizes'] = ['%dx%dx%d' % t for t in s['sizes']]
    for k in ('segmenter_size', 'memory_size'):
        d[k] = '%dx%dx%d' % s[k]
    return d


def machine_info(s: Dict[str, Any]) -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    info = {'cpu': cpu, 'cores_available': available_cores(), 'threads': s['threads'],
            'torch': torch.__version__, 'timm': timm.__version__, 'python': platform.python_version(),
            'platform': platform.platform(), 'device': s['device']}
    if s['device'] == 'cuda':
        info['gpu'] = torch.cuda.get_device_name()
    return info

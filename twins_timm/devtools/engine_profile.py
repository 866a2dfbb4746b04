"""Where an inference engine spends a segmenter's forward, and what that bounds: ``python -m
twins_timm.devtools.engine_profile``.

The bench (``twins-timm bench --engines``) says how fast each engine is; this says why. ONNX Runtime's and
OpenVINO's own profilers time every node of one forward; the matrix products (MatMul, Gemm, Conv, and their
fused forms) are summed with their FLOPs (from the shapes ONNX Runtime records) and set against the machine's
fp32 matmul rate (a 2048 x 2048 ``torch.mm``). The bound printed is the speed-up over plain torch if every
product ran at that rate and everything else took the time it takes now: an engine cannot beat it without
doing less work outside its products.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from twins_timm.adapters import TwinsFPN, TwinsUPerNet
from twins_timm.deploy.export import export_onnx, export_openvino, sample_input
from twins_timm.deploy.runners import INPUT_NAME
from twins_timm.models.twins import checkpoint_family_args

PRODUCT_OPS = ('MatMul', 'Gemm', 'Conv', 'FullyConnected', 'Convolution', 'GroupConvolution')


def _median_seconds(fn: Callable[[], Any], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, runs: int = 5, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / _median_seconds(lambda: torch.mm(a, b), runs) / 1e9


def _is_product(op: str) -> bool:
    return any(op.startswith(p) or op.endswith(p) or p in op for p in PRODUCT_OPS)


def _shapes(entries: List[Dict[str, List[int]]]) -> List[List[int]]:
    return [next(iter(e.values())) for e in entries]


def node_flops(op: str, inputs: List[List[int]], output: List[int]) -> int:
    """FLOPs of one ONNX Runtime node from the shapes it ran with (0 for what is not a product)."""
    out = math.prod(output) if output else 0
    if 'Conv' in op and len(inputs) > 1 and len(inputs[1]) >= 3:
        return 2 * out * math.prod(inputs[1][1:])  # W: (Cout, Cin / groups, kh, kw)
    if 'MatMul' in op and inputs:
        return 2 * out * inputs[0][-1]
    if 'Gemm' in op and inputs and output:
        return 2 * out * (math.prod(inputs[0]) // output[0])
    return 0


def profile_onnxruntime(onnx_path: Path, x: torch.Tensor, runs: int, threads: int) -> Dict[str, Any]:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(onnx_path.parent / 'ort_profile')
    session = ort.InferenceSession(str(onnx_path), options, providers=['CPUExecutionProvider'])
    feed = {INPUT_NAME: x.numpy()}
    session.run(None, feed)  # warm-up (also profiled: dropped below by keeping the last ``runs`` runs)
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    model_runs = [e for e in events if e.get('cat') == 'Session' and e.get('name') == 'model_run']
    kept = model_runs[-runs:]
    start = kept[0]['ts']
    by_op: Dict[str, Dict[str, float]] = defaultdict(lambda: {'seconds': 0.0, 'flops': 0.0})
    for e in events:
        if e.get('cat') != 'Node' or not e.get('name', '').endswith('_kernel_time') or e['ts'] < start:
            continue
        args = e.get('args', {})
        op = args.get('op_name', '?')
        out = _shapes(args.get('output_type_shape', []))
        by_op[op]['seconds'] += e['dur'] / 1e6 / runs
        by_op[op]['flops'] += node_flops(op, _shapes(args.get('input_type_shape', [])), out[0] if out else []) / runs
    total = statistics.median(r['dur'] / 1e6 for r in kept)
    return {'seconds': total, 'ops': dict(by_op)}


def profile_openvino(xml_path: Path, x: torch.Tensor, runs: int, threads: int, precision: str = 'f32'
                     ) -> Dict[str, Any]:
    import openvino as ov
    compiled = ov.Core().compile_model(str(xml_path), 'CPU', {
        'INFERENCE_PRECISION_HINT': precision, 'INFERENCE_NUM_THREADS': str(threads), 'PERF_COUNT': 'YES'})
    request = compiled.create_infer_request()
    feed = {INPUT_NAME: x.numpy()}
    request.infer(feed)
    by_op: Dict[str, Dict[str, float]] = defaultdict(lambda: {'seconds': 0.0, 'flops': 0.0})
    totals = []
    for _ in range(runs):
        t = time.perf_counter()
        request.infer(feed)
        totals.append(time.perf_counter() - t)
        for info in request.profiling_info:
            by_op[info.node_type]['seconds'] += info.real_time.total_seconds() / runs
    return {'seconds': statistics.median(totals), 'ops': dict(by_op)}


def summary(engine: Dict[str, Any], torch_seconds: float, model_flops: int, peak_gflops: float) -> Dict[str, Any]:
    """The engine's products (time, share, rate) and the bound over torch if they ran at the matmul rate."""
    ops = engine['ops']
    product = sum(v['seconds'] for k, v in ops.items() if _is_product(k))
    nodes = sum(v['seconds'] for v in ops.values())
    other = max(0.0, engine['seconds'] - product)
    counted = sum(v['flops'] for k, v in ops.items() if _is_product(k))
    flops = counted or model_flops  # OpenVINO reports no shapes: the model's own count
    at_peak = flops / (peak_gflops * 1e9)
    return {
        'seconds': engine['seconds'], 'speedup': torch_seconds / engine['seconds'],
        'product_seconds': product, 'product_share': product / nodes if nodes else None,
        'product_gflops': flops / product / 1e9 if product else None, 'flops_from': 'shapes' if counted else 'model',
        'other_seconds': other, 'bound_seconds': at_peak + other, 'bound_speedup': torch_seconds / (at_peak + other),
        'top_ops': sorted(((k, v['seconds']) for k, v in ops.items()), key=lambda kv: -kv[1])[:8],
    }


def build(variant: str, head: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = {'fpn': TwinsFPN, 'upernet': TwinsUPerNet}[head]
    return cls(encoder_name=variant, classes=150, aux_head=False,
               encoder_args=checkpoint_family_args('mmseg', variant)).eval()


def run_profile(variant: str, head: str, size: int, runs: int, threads: int, bf16: bool = False,
                log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    model = build(variant, head)
    x = sample_input((1, 3, size, size))
    with torch.inference_mode():
        torch_seconds = _median_seconds(lambda: model(x), runs)
        with FlopCounterMode(display=False) as counter:
            model(x)
    flops = counter.get_total_flops()
    peak = matmul_gflops()
    out: Dict[str, Any] = {'variant': variant, 'head': head, 'size': size, 'threads': threads, 'runs': runs,
                           'torch_seconds': torch_seconds, 'flops': flops, 'matmul_gflops': peak,
                           'torch_bound_speedup': torch_seconds / (flops / (peak * 1e9)), 'engines': {}}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, xml_path = Path(tmp) / 'model.onnx', Path(tmp) / 'openvino_model.xml'
        export_onnx(model, onnx_path, log)
        log('profiling ONNX Runtime')
        out['engines']['onnxruntime'] = summary(profile_onnxruntime(onnx_path, x, runs, threads), torch_seconds,
                                                flops, peak)
        export_openvino(onnx_path, xml_path, log)
        log('profiling OpenVINO')
        out['engines']['openvino'] = summary(profile_openvino(xml_path, x, runs, threads), torch_seconds, flops, peak)
        if bf16:  # its bf16 products against the machine's bf16 matmul rate
            out['matmul_gflops_bf16'] = peak16 = matmul_gflops(dtype=torch.bfloat16)
            log('profiling OpenVINO bf16')
            out['engines']['openvino bf16'] = summary(profile_openvino(xml_path, x, runs, threads, 'bf16'),
                                                      torch_seconds, flops, peak16)
    return out


def render(results: List[Dict[str, Any]], cpu: Optional[str] = None) -> str:
    lines = ['Engine profiles%s: fp32 (OpenVINO bf16 where named), batch 1, products = MatMul / Gemm / Conv nodes (fused forms included); '
             'bound = speed-up over torch if the products ran at the matmul rate and the rest as now.'
             % (' on ' + cpu if cpu else ''), '',
             '| model | size | torch s | GFLOP | matmul GFLOP/s | engine | s | speed-up | products share | '
             'products GFLOP/s | other s | bound |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in results:
        for name, e in r['engines'].items():
            lines.append('| %s %s | %d | %.3f | %.1f | %.0f | %s | %.3f | %.2fx | %s | %s | %.3f | %.2fx |' % (
                r['head'], r['variant'], r['size'], r['torch_seconds'], r['flops'] / 1e9,
                r.get('matmul_gflops_bf16', 0) if name.endswith('bf16') else r['matmul_gflops'], name,
                e['seconds'], e['speedup'], '%.0f %%' % (100 * e['product_share']) if e['product_share'] else '-',
                '%.0f' % e['product_gflops'] if e['product_gflops'] else '-', e['other_seconds'],
                e['bound_speedup']))
    return '\n'.join(lines)


def _cpu_name() -> Optional[str]:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m twins_timm.devtools.engine_profile', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='fpn:twins_svt_small', metavar='LIST',
                   help='comma-separated HEAD:VARIANT (default fpn:twins_svt_small)')
    p.add_argument('--size', type=int, default=512)
    p.add_argument('--runs', type=int, default=5)
    p.add_argument('--threads', type=int, default=torch.get_num_threads())
    p.add_argument('--bf16', action='store_true',
                   help="also OpenVINO at bf16, set against the machine's bf16 matmul rate")
    p.add_argument('--json', type=Path, default=None, help='also write the results here (refused if it exists)')
    args = p.parse_args(argv)
    if args.json is not None and args.json.exists():
        print('%s exists: choose another --json path' % args.json, file=sys.stderr)
        return 2
    results = []
    for spec in args.models.split(','):
        head, _, variant = spec.partition(':')
        results.append(run_profile(variant, head, args.size, args.runs, args.threads, args.bf16))
    cpu = _cpu_name()
    print(render(results, cpu))
    if args.json is not None:
        args.json.write_text(json.dumps({'cpu': cpu, 'results': results}, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())

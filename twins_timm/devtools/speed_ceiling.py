"""The speed ceiling of a forward: how fast it could run if only its essential work took time.

One forward is recorded op by op (a ``TorchDispatchMode``). Its essential work is every matrix product
(linear, matmul, mm / bmm, convolution, attention) and the few other ops no implementation of the same
model can skip or fold into a product: normalisations over channels (LayerNorm), softmaxes outside
fused attention, and resizes. Each recorded call is replayed alone on fresh inputs of the same shapes,
strides, dtypes and ``requires_grad`` (torch's matmul folds batch dimensions by that flag): two
warm-up runs, then the best of five, since GEMM rates on a shared VM swing by a third between runs.
The sum is the ceiling. Activations, eval BatchNorm, residual adds, copies and padding cost nothing
there (they can be fused or folded away), and every op runs at the best rate it reached alone.

A model whose ceiling is at 85 % of the best matmul rate cannot reach 90 % of it; a reference that
takes 1.4x our ceiling cannot be beaten 1.5x without faster kernels. It is a measurement, not a proof:
each replay pays its own memory costs (a fresh output, first touched), which the model may avoid by
reusing memory, so on a noisy machine a model can come out at its ceiling or past it. The recorded
ops are those that ran, with the kernels the model chose (UPerHead's fused conv as its small products):
the ceiling is that of the code as it stands, not of every possible kernel.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable, Dict, List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['PRODUCT_OPS', 'OTHER_ESSENTIAL_OPS', 'flop_mapping', 'record_essential_calls', 'speed_ceiling']

# aten op packets whose work is matrix products; a composite (linear, matmul, conv2d, SDPA) is recorded
# as one call and the ops inside it are not recorded again
PRODUCT_OPS = frozenset({
    'linear', 'matmul', 'mm', 'addmm', 'bmm', 'baddbmm', 'conv1d', 'conv2d', 'convolution',
    'mkldnn_convolution', 'scaled_dot_product_attention', '_scaled_dot_product_flash_attention_for_cpu',
})
# the other work every implementation of the model does: no GEMM epilogue or weight folding absorbs it
OTHER_ESSENTIAL_OPS = frozenset({
    'layer_norm', 'native_layer_norm', 'softmax', '_softmax', 'upsample_bilinear2d', 'upsample_nearest2d',
})


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_mapping() -> Dict[Any, Callable[..., int]]:
    """``FlopCounterMode`` formulas torch lacks: its counter has none for the CPU flash-attention kernel."""
    op = getattr(torch.ops.aten, '_scaled_dot_product_flash_attention_for_cpu', None)
    return {} if op is None else {op: _cpu_flash_attention_flops}


def _spec(value: Any) -> Any:
    """A hashable stand-in for one argument: tensors by layout, containers by their items, other values as
    they are (numbers, dtypes, devices, memory formats)."""
    if isinstance(value, torch.Tensor):
        return ('tensor', tuple(value.shape), tuple(value.stride()), value.dtype, str(value.device),
                value.requires_grad)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_spec(v) for v in value))
    if isinstance(value, dict):
        return ('dict', tuple(sorted((k, _spec(v)) for k, v in value.items())))
    hash(value)  # an unhashable argument of a product op would be a new kind of op: fail loudly
    return ('value', value)


def _make(spec: Any, gen: torch.Generator) -> Any:
    """Fresh inputs for a recorded spec: random values, the recorded strides and ``requires_grad``."""
    kind, *fields = spec
    if kind == 'tensor':
        shape, stride, dtype, device, requires_grad = fields
        size = 1 + sum((n - 1) * s for n, s in zip(shape, stride)) if all(shape) else 0  # expanded: shared
        with torch.inference_mode(False):
            # a base tensor, not a view of one: views of a view take requires_grad from its base, and in
            # inference mode a weight's transpose would then lose the flag matmul's folding reads
            tensor = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            memory = tensor.as_strided((size,), (1,))
            if dtype.is_floating_point:
                memory.normal_(generator=gen if device == 'cpu' else None)
            else:
                memory.zero_()
            return tensor.requires_grad_(requires_grad and dtype.is_floating_point)
    if kind in ('list', 'tuple'):
        items = [_make(s, gen) for s in fields[0]]
        return items if kind == 'list' else tuple(items)
    if kind == 'dict':
        return {k: _make(v, gen) for k, v in fields[0]}
    return fields[0]


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in PRODUCT_OPS or name in OTHER_ESSENTIAL_OPS:
            self.calls[(func, _spec(tuple(args)), _spec(kwargs))] += 1
            return func(*args, **kwargs)  # the mode is off in here: the call's inner ops are not seen again
        with self:  # any other composite: its inner ops are seen (an einsum's bmm, an interpolate's resize)
            decomposed = func.decompose(*args, **kwargs)
        return func(*args, **kwargs) if decomposed is NotImplemented else decomposed


def record_essential_calls(fn: Callable[[], Any]) -> Counter:
    """(op, args spec, kwargs spec) -> number of calls of the essential ops, over one call of ``fn``."""
    recorder = _Recorder()
    with recorder:
        fn()
    return recorder.calls


def _describe(args_spec: Any) -> List[List[int]]:
    return [list(s[1]) for s in args_spec[1] if s[0] == 'tensor']


def speed_ceiling(fn: Callable[[], Any], repeats: int = 5, sync: Callable[[], None] = lambda: None) -> Dict[str, Any]:
    """Seconds one call of ``fn`` would take if only its essential ops took time, each alone at its best.

    Returns ``seconds`` (the sum), its ``product_seconds`` and ``other_seconds``, ``calls`` and ``distinct``
    ops, the products' FLOPs, and ``ops``: per distinct call its op, kind ('product' or 'other'), input
    shapes, calls, best seconds per call and GFLOP/s, slowest total first. Run ``fn`` once before (warm):
    work of a first call (allocations, lazy set-up) would otherwise be recorded too.
    """
    from torch.utils.flop_counter import FlopCounterMode
    calls = record_essential_calls(fn)
    gen = torch.Generator().manual_seed(0)
    ops, flops = [], 0
    seconds = {'product': 0.0, 'other': 0.0}
    for (func, args_spec, kwargs_spec), count in calls.items():
        args, kwargs = _make(args_spec, gen), _make(kwargs_spec, gen)
        with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
            func(*args, **kwargs)
        func(*args, **kwargs)  # warm-up: a GEMM's first runs on fresh memory were up to 2x slower here
        best = float('inf')
        for _ in range(max(1, repeats)):
            sync()
            t0 = time.perf_counter()
            func(*args, **kwargs)
            sync()
            best = min(best, time.perf_counter() - t0)
        name = func.overloadpacket.__name__
        kind = 'product' if name in PRODUCT_OPS else 'other'
        op_flops = int(counter.get_total_flops())
        seconds[kind] += count * best
        flops += count * op_flops
        ops.append({'op': name, 'kind': kind, 'shapes': _describe(args_spec), 'calls': count,
                    'seconds_per_call': best, 'gflops': op_flops / best / 1e9 if op_flops and best > 0 else None})
        del args, kwargs
    ops.sort(key=lambda o: -o['calls'] * o['seconds_per_call'])
    return {'seconds': seconds['product'] + seconds['other'], 'product_seconds': seconds['product'],
            'other_seconds': seconds['other'], 'calls': sum(calls.values()), 'distinct': len(calls),
            'flops': flops, 'ops': ops}


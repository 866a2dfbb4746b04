"""The engines of `twins-timm bench --engines`: one model exported once, then every engine x dtype made ready
on the same input, with its parity against torch fp32; the bench times the ready ones side by side.

No single engine wins everywhere (the issue's 2-core EPYC: FPN PCPVT-S fastest in OpenVINO bf16, UPerNet SVT-S
in our torch path at fp32), so they are measured together, on the machine at hand.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from twins_timm.optimize import optimize
from twins_timm.inference.numerics import max_abs_diff, scaled_diff

from twins_timm.deploy.engines import ENGINE_MODULES, NO_ORT_BF16, TorchAutocast, native_bf16
from twins_timm.deploy.export import OPENVINO_XML, ONNX_FILE, export_onnx, export_openvino, require_modules
from twins_timm.deploy.runners import Outputs, Runner, load_onnxruntime, load_openvino

# (engine, dtype) in the order they are reported; torch fp32 first: the plain model, the reference of the others.
# 'torch+optimize' is the same model after twins_timm.optimize (what segment / eval run on --engine torch).
OPTIMIZED = 'torch+optimize'
ENGINE_DTYPES: Tuple[Tuple[str, str], ...] = (('torch', 'fp32'), ('torch', 'bf16'), (OPTIMIZED, 'fp32'),
                                              (OPTIMIZED, 'bf16'), ('onnxruntime', 'fp32'), ('openvino', 'fp32'),
                                              ('openvino', 'bf16'))
METHOD = ("each model is exported once (torch.onnx.export(dynamo=True) of the plain model, batch and size free; "
          'OpenVINO IR converted from that file, fp32 weights): export_seconds, and convert_seconds for OpenVINO. '
          'Every engine x dtype is then loaded (load_seconds) and called once on the input (first_call_seconds, '
          'which includes any compilation on first shapes), and timed with the others interleaved. torch bf16: '
          'autocast; OpenVINO: INFERENCE_PRECISION_HINT f32 / bf16 (set explicitly either way); ONNX Runtime: '
          'fp32 only (its CPU provider has no bf16 kernels). torch+optimize: the model after twins_timm.optimize '
          '(its CPU-inference layers). bf16 runs only where the CPU computes it natively '
          '(avx512_bf16 or amx_bf16 in /proc/cpuinfo). Parity against torch fp32 on the same input: max_abs_diff, '
          "scaled_diff (share of the reference's scale) and, for segmenters, argmax_agreement (share of pixels "
          'with the same class)')


def parity(got: Outputs, want: Outputs, segmenter: bool) -> Dict[str, Optional[float]]:
    """How far an engine's outputs are from torch fp32's on the same input."""
    agreement = None
    if segmenter:
        agreement = float((got.argmax(dim=1) == want.argmax(dim=1)).float().mean())
    return {'max_abs_diff': max_abs_diff(got, want), 'scaled_diff': scaled_diff(got, want),
            'argmax_agreement': agreement}


def unavailable(engine: str, dtype: str, device: str) -> Optional[str]:
    """Why ``engine`` at ``dtype`` is not measured here, or None."""
    if device != 'cpu':
        return 'the engines are compared on the CPU (--device cpu)'
    try:
        require_modules(ENGINE_MODULES.get(engine, ()), engine)
    except ValueError as e:
        return str(e)
    if dtype == 'bf16':
        if engine == 'onnxruntime':
            return NO_ORT_BF16
        native, why = native_bf16()
        if not native:
            return 'no native bf16: %s' % why
    return None


def _timed(fn: Callable[[], Any]) -> Tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def prepare_engines(model: nn.Module, x: torch.Tensor, output_names: Sequence[str], workdir: Path,
                    segmenter: bool, device: str, log: Callable[[str], None]
                    ) -> Tuple[Dict[str, Runner], List[Dict[str, Any]]]:
    """(ready runners by 'engine dtype', one row per engine x dtype): exports into ``workdir`` as needed.

    A row that cannot be measured says why ('skipped' or 'error'), and the others go on.
    """
    with torch.inference_mode():
        want = model(x)
    runners: Dict[str, Runner] = {}
    rows: List[Dict[str, Any]] = []
    made: Dict[str, Any] = {}  # file -> seconds it took, or the exception that stopped it; 'optimized' -> model
    onnx_path, xml_path = workdir / ONNX_FILE, workdir / OPENVINO_XML

    def make(name: str, fn: Callable[[], None]) -> float:
        if name not in made:
            try:
                made[name] = _timed(fn)[1]
            except Exception as e:  # an export that fails is a result of the bench, not a crash
                made[name] = e
        if isinstance(made[name], Exception):
            raise made[name]
        return made[name]

    for engine, dtype in ENGINE_DTYPES:
        row: Dict[str, Any] = {'engine': engine, 'dtype': dtype}
        rows.append(row)
        reason = unavailable(engine, dtype, device)
        if reason:
            row['skipped'] = reason
            continue
        try:
            if engine in ('torch', OPTIMIZED):
                if engine == OPTIMIZED and 'optimized' not in made:
                    made['optimized'] = optimize(copy.deepcopy(model))
                base = model if engine == 'torch' else made['optimized']
                run = base if dtype == 'fp32' else TorchAutocast(base)
                row['load_seconds'] = 0.0
            else:
                log('%s %s: %s' % (engine, dtype, 'loading' if 'onnx' in made else 'exporting to ONNX, then loading'))
                row['export_seconds'] = make('onnx', lambda: export_onnx(model, onnx_path, log, output_names))
                if engine == 'openvino':
                    row['convert_seconds'] = make('openvino', lambda: export_openvino(onnx_path, xml_path, log))
                    run, row['load_seconds'] = _timed(lambda: load_openvino(xml_path, dtype))
                else:
                    run, row['load_seconds'] = _timed(lambda: load_onnxruntime(onnx_path))
            with torch.inference_mode():
                got, row['first_call_seconds'] = _timed(lambda: run(x))
            row.update(parity(got, want, segmenter))
            runners['%s %s' % (engine, dtype)] = run
        except Exception as e:
            row['error'] = ' '.join(str(e).split())[:300] or type(e).__name__
    return runners, rows

"""Inference engines where the torch segmenter was: a module taking the normalised NCHW float tensor, giving logits.

``engine_model(model, 'onnxruntime' | 'openvino' | 'torch', 'fp32' | 'bf16')`` returns an ``nn.Module`` with
the model's ``mean``, ``std`` and classes, so every inference mode (whole, slide, TTA, batches, torchrun
shards) runs unchanged on any engine.  ONNX Runtime and OpenVINO run the exported plain model, made on
first use under ``twins_timm.zoo.cache_dir()/exports/<sha of the weights>/<engine>-<version>-torch<version>/``
(never in a user's folder), verified by its recorded sha256s before every use, then reused offline.
"""
from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch
from filelock import FileLock
from torch import nn

from twins_timm import zoo
from twins_timm.files.atomic import atomic_path
from twins_timm.files.paths import check_writable_dir

from .export import (FORMAT_MODULES, OPENVINO_XML, ONNX_FILE, engine_versions, export_folder, folder_problem,
                     require_modules, weights_sha256)
from .runners import Outputs, Runner, load_onnxruntime, load_openvino

ENGINES = ('torch', 'onnxruntime', 'openvino')
DTYPES = ('fp32', 'bf16')
ENGINE_MODULES = {'torch': (), 'onnxruntime': FORMAT_MODULES['onnx'], 'openvino': FORMAT_MODULES['openvino']}
# what the inference tools read from a segmenter besides calling it
METADATA = ('mean', 'std', 'classes', 'class_names', 'palette')
NATIVE_BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
NO_ORT_BF16 = "ONNX Runtime's CPU execution provider has no bf16 kernels for this model's operations (MatMul, Conv)"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def native_bf16() -> Tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the flags that say so or the reason it does not)."""
    try:
        text = Path('/proc/cpuinfo').read_text()
    except OSError:
        return False, 'the CPU flags cannot be read (/proc/cpuinfo)'
    line = next((l for l in text.splitlines() if l.startswith('flags')), '')
    flags = set(line.split(':', 1)[-1].split())
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if found:
        return True, 'CPU flags %s' % ', '.join(found)
    return False, 'this CPU has neither of the flags %s' % ' nor '.join(NATIVE_BF16_FLAGS)


def check_engine_request(engine: str, dtype: str, force_bf16: bool = False, device: str = 'auto') -> str:
    """Refuse what cannot run before any work; return the device to use ('auto' becomes 'cpu' for exported
    engines, which run on the CPU)."""
    if engine not in ENGINES or dtype not in DTYPES:
        raise ValueError('--engine must be one of %s and --dtype one of %s' % (', '.join(ENGINES), ', '.join(DTYPES)))
    if engine != 'torch':
        if device not in ('auto', 'cpu'):
            raise ValueError('--engine %s runs on the CPU; leave --device out or give --device cpu (on a GPU use '
                             'the default --engine torch)' % engine)
        require_modules(ENGINE_MODULES[engine], '--engine %s' % engine)
        check_writable_dir(zoo.cache_dir() / 'exports', 'the export cache (move it with TWINS_TIMM_CACHE)')
        device = 'cpu'
    if dtype == 'bf16':
        if engine == 'onnxruntime':
            raise ValueError('--engine onnxruntime --dtype bf16: %s, so it runs fp32 only. For bf16 on the CPU use '
                             '--engine openvino --dtype bf16 or --engine torch --dtype bf16' % NO_ORT_BF16)
        on_cpu = engine != 'torch' or device == 'cpu' or (device == 'auto' and not torch.cuda.is_available())
        native, why = native_bf16()
        if on_cpu and not native and not force_bf16:
            raise ValueError('--dtype bf16: %s (AVX512-BF16 or AMX), so bf16 would be emulated, slower than fp32. '
                             'Keep the default --dtype fp32, or pass --force-bf16 to run bf16 '
                             'anyway' % why)
    return device


class EngineModel(nn.Module):
    """An exported engine in the torch model's place: ``forward(x)`` -> logits, the model's metadata kept."""

    def __init__(self, run: Runner, like: nn.Module, engine: str, dtype: str, folder: Optional[Path] = None):
        super().__init__()
        self._run = run
        self.engine, self.dtype_name, self.folder = engine, dtype, folder
        for name in METADATA:
            setattr(self, name, getattr(like, name, None))

    def forward(self, x: torch.Tensor) -> Outputs:
        return self._run(x)


class TorchAutocast(nn.Module):
    """The torch model under bf16 autocast (device of the input), outputs handed on as float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        for name in METADATA:
            setattr(self, name, getattr(model, name, None))

    def forward(self, x: torch.Tensor) -> Outputs:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = self.model(x)
        return out.float() if isinstance(out, torch.Tensor) else [t.float() for t in out]


def export_entry(weights_sha: str, engine: str) -> Path:
    """The cache folder of one model's export for one engine and its version (and the exporter's)."""
    versions = engine_versions()
    tag = re.sub(r'[^\w.+-]', '_', '%s-%s-torch%s' % (engine, versions.get(engine), versions['torch']))
    return zoo.cache_dir() / 'exports' / weights_sha[:16] / tag


def cached_export(model: nn.Module, engine: str, source: str = '', log: Log = _stderr) -> Path:
    """The verified cache folder of ``model``'s export for ``engine``: made now (progress on ``log``) if missing
    or if what is there fails its sha256s; one process exports, others (torchrun) wait for it."""
    sha = weights_sha256(model)
    entry = export_entry(sha, engine)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(entry) + '.lock'):
        if entry.exists():
            problem = folder_problem(entry, sha)
            if problem is None:
                log('Using the %s export cached in %s' % (engine, entry))
                return entry
            log('The cached export %s %s: exporting again' % (entry, problem))
            shutil.rmtree(entry)
        log('Exporting the model for %s once (cached in %s) ...' % (engine, entry))
        with atomic_path(entry, folder=True) as tmp:
            config = export_folder(model, tmp, engine == 'openvino', source, log, weights_sha=sha)
        log('Exported in %.0f s' % config['export_seconds'])
    return entry


def engine_model(model: nn.Module, engine: str = 'torch', dtype: str = 'fp32', source: str = '',
                 log: Log = _stderr) -> nn.Module:
    """``model`` on ``engine`` at ``dtype``: the model itself for torch fp32, else a module in its place."""
    if engine == 'torch':
        return model if dtype == 'fp32' else TorchAutocast(model)
    if engine not in ENGINES:
        raise ValueError('unknown engine %r; choose from %s' % (engine, ', '.join(ENGINES)))
    require_modules(ENGINE_MODULES[engine], '--engine %s' % engine)
    folder = cached_export(model, engine, source, log)
    if engine == 'onnxruntime':
        if dtype != 'fp32':
            raise ValueError('%s: --engine onnxruntime runs fp32 only' % NO_ORT_BF16)
        run = load_onnxruntime(folder / ONNX_FILE)
    else:
        run = load_openvino(folder / OPENVINO_XML, dtype)
    return EngineModel(run, model, engine, dtype, folder)

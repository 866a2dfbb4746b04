"""Export a Twins segmenter to ONNX (and OpenVINO IR) with free batch, height and width, checked against torch.

The exported graph is the plain model (timm's kernels, no CPU-inference calibration): what
``torch.export`` traces.  Batch, height and width stay symbolic, so one file runs any batch and any
H, W >= 32; every export is run once at a size it was not traced at and compared with torch.

A folder holds ``model.onnx`` (+ ``openvino_model.xml`` / ``.bin``, the names optimum uses), a
``config.json`` naming the input normalisation, the classes and the sha256 of every file, and a
README.  onnx, onnxscript, onnxruntime and openvino are optional (``pip install "twins-timm[deploy]"``):
they are imported only when an export or an engine needs them.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import time
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from twins_timm.models.twins import MIN_INPUT_SIZE
from twins_timm.inference.predict import DEFAULT_MEAN, DEFAULT_STD
from twins_timm.inference.numerics import max_abs_diff, scaled_diff

from .runners import INPUT_NAME, OUTPUT_NAME, load_onnxruntime, load_openvino

ONNX_FILE = 'model.onnx'
OPENVINO_XML = 'openvino_model.xml'
OPENVINO_BIN = 'openvino_model.bin'
CONFIG_FILE = 'config.json'
README_FILE = 'README.md'
FORMATS = ('onnx', 'openvino')
EXPORT_FILES = (ONNX_FILE, OPENVINO_XML, OPENVINO_BIN)  # what config.json may list, with their sha256
DEPLOY_INSTALL = 'pip install "twins-timm[deploy]"'
# Python modules each format needs (the [deploy] extra installs them all)
FORMAT_MODULES = {'onnx': ('onnx', 'onnxscript', 'onnxruntime'), 'openvino': ('onnx', 'onnxscript', 'openvino')}
# Traced at batch 2 (batch 1 would be specialised) and a size whose every stage, window grid included, is
# larger than 1 x 1 and padded. Checked at other batches and at two sizes, so a graph specialised either way
# fails: one with other remainders everywhere (and a single SVT window), one a multiple of the patches and
# windows at every stage (no padding at all).
TRACE_SHAPE = (2, 3, 288, 320)
CHECK_SHAPES = ((1, 3, 97, 130), (3, 3, 224, 224))
# Largest difference from torch fp32 an export may show, as a share of the logits' scale (numerics.scaled_diff):
# measured ~1e-6 on the S models, so this catches a wrong graph and nothing else.
CHECK_TOLERANCE = 1e-3

Log = Callable[[str], None]


class ExportError(ValueError):
    """An export that cannot be made or that disagrees with torch (a one-paragraph error for the CLI)."""


def require_modules(modules: Sequence[str], what: str) -> None:
    """Raise a one-paragraph error naming the [deploy] extra unless ``modules`` are all installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError('%s needs the Python package(s) %s, which are not installed. Install the optional '
                          'deployment dependencies with: %s' % (what, ', '.join(missing), DEPLOY_INSTALL))


def weights_sha256(model: nn.Module) -> str:
    """sha256 of what the exported graph is made of: the model's class, backbone options and every tensor."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(json.dumps(getattr(model, 'encoder_args', None), sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(('%s %s %s' % (name, tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def sample_input(shape: Tuple[int, int, int, int], seed: int = 0) -> torch.Tensor:
    """A normalised-image-like input: the check compares engines on it."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Check:
    """One exported file run at a size it was not traced at, against torch fp32."""
    engine: str
    shape: Tuple[int, ...]
    max_abs_diff: float
    scaled_diff: float


def check_against_torch(engine: str, run: Callable[[torch.Tensor], torch.Tensor], model: nn.Module,
                        shape: Tuple[int, int, int, int]) -> Check:
    """Run ``run`` and the torch model on the same input; raise unless they agree within CHECK_TOLERANCE."""
    x = sample_input(shape, seed=1)
    with torch.inference_mode():
        want = model(x)
    got = run(x)
    if tuple(got.shape) != tuple(want.shape):
        raise ExportError('the %s export gives logits of shape %s at input %s, torch %s: the export is wrong'
                          % (engine, tuple(got.shape), shape, tuple(want.shape)))
    check = Check(engine, shape, max_abs_diff(got, want), scaled_diff(got, want))
    if not check.scaled_diff <= CHECK_TOLERANCE:
        raise ExportError('the %s export disagrees with torch at input %s: max |difference| %.3g (%.3g of the '
                          "logits' scale, allowed %g); nothing was kept"
                          % (engine, 'x'.join(map(str, shape)), check.max_abs_diff, check.scaled_diff,
                             CHECK_TOLERANCE))
    return check


def export_onnx(model: nn.Module, path: Path, log: Log, output_names: Sequence[str] = (OUTPUT_NAME,)) -> None:
    """``torch.onnx.export(dynamo=True)`` of the plain model, batch / height / width symbolic."""
    require_modules(FORMAT_MODULES['onnx'], 'ONNX export')
    free = torch.export.Dim.DYNAMIC
    log('tracing the model with torch.export (batch, height and width free) and writing ONNX ...')
    # an optimized model traces its plain path too: its layers take their kernels only in eager CPU inference
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        program = torch.onnx.export(model, (sample_input(TRACE_SHAPE),), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(output_names), dynamic_shapes=({0: free, 2: free, 3: free},),
                                    optimize=True, verbose=False)
    program.save(str(path))


def export_openvino(onnx_path: Path, xml_path: Path, log: Log) -> None:
    """OpenVINO IR (fp32 weights: the precision is chosen when it is loaded) from the ONNX file."""
    require_modules(FORMAT_MODULES['openvino'], 'OpenVINO export')
    import openvino as ov
    log('converting the ONNX file to OpenVINO IR ...')
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def engine_versions() -> Dict[str, Optional[str]]:
    """Versions of the exporter and the engines (None: not installed); recorded in config.json."""
    versions: Dict[str, Optional[str]] = {'torch': torch.__version__}
    for dist in ('twins-timm', 'onnx', 'onnxscript', 'onnxruntime', 'openvino'):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def model_metadata(model: nn.Module) -> Dict[str, object]:
    """What a user of the exported file needs besides the graph: normalisation and classes."""
    return {
        'mean': list(getattr(model, 'mean', None) or DEFAULT_MEAN),
        'std': list(getattr(model, 'std', None) or DEFAULT_STD),
        'classes': getattr(model, 'classes', None),
        'class_names': list(getattr(model, 'class_names', None) or []),
        'palette': [list(c) for c in (getattr(model, 'palette', None) or [])],
    }


def export_folder(model: nn.Module, folder: Path, openvino: bool, source: str, log: Log,
                  weights_sha: Optional[str] = None) -> Dict[str, object]:
    """Write model.onnx (+ the OpenVINO IR if ``openvino``), config.json and README.md into the existing empty
    ``folder``; return the config.

    Raises ExportError (nothing usable left behind: the caller removes ``folder``) when an export disagrees
    with torch.
    """
    model = model.cpu().eval()
    folder = Path(folder)
    checks: List[Check] = []
    started = time.perf_counter()
    export_onnx(model, folder / ONNX_FILE, log)
    runners = {'onnxruntime': lambda: load_onnxruntime(folder / ONNX_FILE)}
    if openvino:
        export_openvino(folder / ONNX_FILE, folder / OPENVINO_XML, log)
        runners['openvino'] = lambda: load_openvino(folder / OPENVINO_XML, 'fp32')
    for engine, load in runners.items():
        run = load()
        for shape in CHECK_SHAPES:
            log('checking the export in %s against torch at %s ...' % (engine, 'x'.join(map(str, shape))))
            checks.append(check_against_torch(engine, run, model, shape))
    files = [ONNX_FILE] + ([OPENVINO_XML, OPENVINO_BIN] if openvino else [])
    meta = model_metadata(model)
    config = {
        'exported_by': 'twins-timm',
        'source': source,
        'weights_sha256': weights_sha or weights_sha256(model),
        'formats': ['onnx'] + (['openvino'] if openvino else []),
        'input': {'name': INPUT_NAME, 'layout': 'NCHW', 'dtype': 'float32', 'channels': 'RGB',
                  'min_size': MIN_INPUT_SIZE, 'normalisation': '(rgb_0_255 - mean) / std', 'mean': meta['mean'],
                  'std': meta['std'], 'dynamic': ['batch', 'height', 'width']},
        'output': {'name': OUTPUT_NAME, 'layout': 'NCHW', 'size': "the input's height and width",
                   'channels': 'one raw score per class (argmax: the class index)'},
        **{k: meta[k] for k in ('classes', 'class_names', 'palette')},
        'checks': [vars(c) for c in checks],
        'export_seconds': time.perf_counter() - started,
        'versions': engine_versions(),
        'files': {name: file_sha256(folder / name) for name in files},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + '\n')
    (folder / README_FILE).write_text(readme(config))
    return config


def folder_problem(folder: Path, weights_sha: Optional[str] = None) -> Optional[str]:
    """Why ``folder`` is not a complete, unchanged export of ours (of ``weights_sha`` if given); None if it is."""
    try:
        config = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return 'has no readable %s' % CONFIG_FILE
    if not isinstance(config, dict) or config.get('exported_by') != 'twins-timm':
        return 'was not written by twins-timm export'
    if weights_sha is not None and config.get('weights_sha256') != weights_sha:
        return 'holds other weights'
    files = config.get('files')
    if not isinstance(files, dict) or ONNX_FILE not in files:
        return 'lists no exported files'
    for name, sha in files.items():
        if name not in EXPORT_FILES:
            return 'lists a file export never writes (%r)' % name
        path = Path(folder) / str(name)
        if not path.is_file() or file_sha256(path) != sha:
            return 'has a missing or changed %s' % name
    return None


def readme(config: Dict[str, object]) -> str:
    """A short model card for the exported folder: what goes in, what comes out."""
    inp, classes = config['input'], config['classes']
    lines = [
        '# Twins segmenter, exported by twins-timm',
        '',
        'Source: %s' % config['source'],
        '',
        'Files: %s.' % ', '.join('`%s`' % f for f in config['files']),
        '',
        '- Input `%s`: float32 NCHW RGB, any batch and any height and width >= %d (no multiple-of rule), '
        'normalised on the 0-255 scale as `(x - mean) / std` with mean = %s and std = %s.'
        % (INPUT_NAME, inp['min_size'], inp['mean'], inp['std']),
        '- Output `%s`: float32 (batch, %s, height, width), one raw score per class at the input size; '
        'the argmax over dimension 1 is the class index (names and colours in config.json).'
        % (OUTPUT_NAME, classes),
        '',
        'Checked against torch when exported: %s.' % '; '.join(
            '%s max |difference| %.2g at %s' % (c['engine'], c['max_abs_diff'], 'x'.join(map(str, c['shape'])))
            for c in config['checks']),
        '',
        'Run it with ONNX Runtime (`onnxruntime.InferenceSession("model.onnx").run(None, {"%s": x})`), '
        'OpenVINO (`openvino.Core().compile_model("openvino_model.xml", "CPU")`), or through twins-timm: '
        '`twins-timm segment --engine onnxruntime|openvino`.' % INPUT_NAME,
        '',
    ]
    return '\n'.join(lines)

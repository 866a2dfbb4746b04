"""Exported files run by their engines as plain functions: normalised NCHW float32 tensor in, logits out (or
a list of tensors, for a model with several outputs such as a backbone's feature maps).

The engines' own packages (optional: ``pip install "twins-timm[deploy]"``) are imported here, when a file is
loaded, so that a base install never needs them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Union

import torch

INPUT_NAME = 'pixel_values'
OUTPUT_NAME = 'logits'
# OpenVINO's names of our dtypes: set explicitly, since its own default on CPUs with bf16 is bf16
OPENVINO_PRECISION = {'fp32': 'f32', 'bf16': 'bf16'}

Outputs = Union[torch.Tensor, List[torch.Tensor]]
Runner = Callable[[torch.Tensor], Outputs]


def _as_numpy(x: torch.Tensor):
    return x.detach().to('cpu', torch.float32).contiguous().numpy()


def _outputs(arrays) -> Outputs:
    tensors = [torch.from_numpy(a) for a in arrays]
    return tensors[0] if len(tensors) == 1 else tensors


def load_onnxruntime(path: Path, threads: Optional[int] = None) -> Runner:
    """An ONNX Runtime CPU session of ``path`` (fp32; ONNX Runtime's CPU provider has no bf16 kernels)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()  # torchrun: one core per process
    options.log_severity_level = 3  # errors only: no warnings about shapes it cannot infer ahead
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])

    def run(x: torch.Tensor) -> Outputs:
        return _outputs(session.run(None, {INPUT_NAME: _as_numpy(x)}))
    return run


def load_openvino(xml_path: Path, dtype: str, threads: Optional[int] = None) -> Runner:
    """The OpenVINO IR compiled for the CPU at ``dtype`` ('fp32' or 'bf16')."""
    import openvino as ov
    compiled = ov.Core().compile_model(str(xml_path), 'CPU', {
        'INFERENCE_PRECISION_HINT': OPENVINO_PRECISION[dtype],
        'INFERENCE_NUM_THREADS': str(threads or torch.get_num_threads()),
    })
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> Outputs:
        request.infer({INPUT_NAME: _as_numpy(x)})
        return _outputs(request.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs)))
    return run

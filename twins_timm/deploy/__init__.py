"""Deployment on CPU inference engines: ONNX / OpenVINO export and engines in the torch model's place.

    from twins_timm.deploy import engine_model, export_folder
    model = engine_model(segmenter, 'openvino', 'bf16')   # exported once, cached, then a drop-in module

The optional packages (onnx, onnxscript, onnxruntime, openvino) come with ``pip install "twins-timm[deploy]"``.
"""
from .engines import DTYPES, ENGINES, EngineModel, check_engine_request, engine_model, native_bf16
from .export import INPUT_NAME, OUTPUT_NAME, ExportError, export_folder, folder_problem

__all__ = ['DTYPES', 'ENGINES', 'EngineModel', 'ExportError', 'INPUT_NAME', 'OUTPUT_NAME', 'check_engine_request',
           'engine_model', 'export_folder', 'folder_problem', 'native_bf16']

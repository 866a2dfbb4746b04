"""Python API of the converter; the command line (``cli.py``) is a thin shell over it.

>>> from twins_timm.convert import convert_checkpoint, build_model, save
>>> res = convert_checkpoint('alt_gvt_small.pth')          # read + detect + map, every key accounted for
>>> model = build_model(res)                                # timm model or SMP segmenter, strict load
>>> save(res, 'twins_svt_small.in1k')                       # Hub folder (config.json, model.safetensors, README)

One module per job: ``read`` (files, folders), ``mapping`` (detect + rule tables), ``build`` (target
models on the meta device), ``save`` (atomic outputs), ``verify`` (parity, read-back); formats are
records in ``formats``.
"""
from twins_timm.convert.build import SEGMENTER_TASKS, build_model, make_model, target_shapes
from twins_timm.convert.formats import FORMATS, Format, family_args, get_format
from twins_timm.convert.mapping import ConversionResult, convert_checkpoint, parse_drop, to_mmseg
from twins_timm.convert.save import DTYPES, SaveInfo, parse_dtype, save
from twins_timm.convert.verify import reference_parity, verify_written

__all__ = [
    'SEGMENTER_TASKS', 'build_model', 'make_model', 'target_shapes', 'FORMATS', 'Format', 'family_args',
    'get_format', 'ConversionResult', 'convert_checkpoint', 'parse_drop', 'to_mmseg', 'DTYPES', 'SaveInfo',
    'parse_dtype', 'save', 'reference_parity', 'verify_written',
]

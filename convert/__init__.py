"""Checkpoint converter: official Twins / mmsegmentation / timm files -> timm backbones and SMP segmenters.

    from twins_timm.convert import convert_checkpoint, build_model, save
"""
from twins_timm.convert.api import (ConversionResult, SaveInfo, build_model, convert_checkpoint, family_args,
                                    make_model, reference_parity, save, target_shapes, to_mmseg)
from twins_timm.convert.detect import Detection, DetectionError, detect, normalize_variant, unwrap
from twins_timm.convert.engine import MappingError, apply_rules
from twins_timm.convert.formats import FORMATS, Format, get_format
from twins_timm.convert.hub import push_to_hub
from twins_timm.files.checkpoint import CheckpointReadError, UnsafeCheckpointError, load_file, sha256_file
from twins_timm.files.disk import DiskFullError

__all__ = [
    'ConversionResult', 'SaveInfo', 'build_model', 'convert_checkpoint', 'family_args', 'make_model',
    'reference_parity', 'save', 'target_shapes', 'to_mmseg', 'Detection', 'DetectionError', 'detect',
    'normalize_variant', 'unwrap', 'MappingError', 'apply_rules', 'FORMATS', 'Format', 'get_format', 'push_to_hub', 'CheckpointReadError',
    'UnsafeCheckpointError', 'load_file', 'sha256_file', 'DiskFullError',
]

"""Saving job: Hub folders, .safetensors files and mmseg checkpoints, atomically, honouring the umask."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from twins_timm.convert import hub
from twins_timm.convert.build import build_model
from twins_timm.convert.mapping import ConversionResult, to_mmseg
from twins_timm.convert.verify import reference_parity, verify_written
from twins_timm.files.atomic import check_destination, save_safetensors, save_torch
from twins_timm.files.checkpoint import sha256_file
from twins_timm.files.disk import check_free_space
from twins_timm.files.ownership import hub_folder_not_ours, mmseg_not_ours, safetensors_not_ours
from twins_timm.files.paths import PathLike


DTYPES = {'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16, 'float16': torch.float16,
          'half': torch.float16, 'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError('unknown dtype %r; use fp32, fp16 or bf16' % dtype)
    return DTYPES[str(dtype).lower()]


def _cast_state_dict(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
# each output kind's test of whether an existing DST is an earlier output of ours (--force replaces only that)
NOT_OURS = {'mmseg checkpoint': mmseg_not_ours, 'safetensors': safetensors_not_ours, 'folder': hub_folder_not_ours}


def output_kind(dst: PathLike, to: str = 'timm') -> str:
    """What ``save`` writes at ``dst``: 'folder', 'safetensors' or 'mmseg checkpoint' (from the suffix)."""
    suffix = Path(dst).suffix
    if to == 'mmseg':
        if suffix not in TORCH_SUFFIXES:
            raise ValueError('--to mmseg writes a .pth checkpoint; give an output path ending in .pth')
        return 'mmseg checkpoint'
    if to != 'timm':
        raise ValueError('unknown output format %r; use timm (default) or mmseg' % to)
    if suffix in TORCH_SUFFIXES:
        raise ValueError('%s: a timm output is a Hub folder (give a folder path) or a .safetensors file; for an '
                         'mmseg .pth pass --to mmseg' % dst)
    return 'safetensors' if suffix == '.safetensors' else 'folder'


def check_output(dst: PathLike, to: str = 'timm', force: bool = False) -> str:
    """Before any work: ``dst`` suits ``to``, and is new or (with ``force``) an earlier output of ours."""
    kind = output_kind(dst, to)
    check_destination(dst, force, NOT_OURS[kind], what='DST')
    return kind


def output_bytes(res: ConversionResult, dtype: Optional[torch.dtype]) -> int:
    """About what the weights take on disk (the state dict, cast)."""
    return sum(v.numel() * (dtype.itemsize if dtype is not None and v.is_floating_point() else v.element_size())
               for v in res.state_dict.values())


@dataclass
class SaveInfo:
    path: Path
    kind: str               # 'timm folder' | 'segmenter folder' | 'safetensors' | 'mmseg checkpoint'
    weights: Path           # the weights file inside (or the file itself)
    sha256: str
    parity: Optional[Dict[str, Any]] = None
    dropped_parts: List[str] = field(default_factory=list)   # left out of this output only


def save(res: ConversionResult, dst: PathLike, to: str = 'timm', force: bool = False,
         dtype: Union[str, torch.dtype, None] = None, parity: bool = True,
         mmseg_drop: Union[str, Iterable[str], None] = (), card: Optional[Mapping[str, Any]] = None) -> SaveInfo:
    """Write a conversion result, atomically; over an existing path only with ``force``, and only over an
    earlier output of ours (see ``NOT_OURS``). A full disk is a ``DiskFullError`` with nothing left behind.

    * ``to='timm'`` and ``dst`` a folder: a Hub folder (timm model, or SMP segmenter for fpn/upernet).
    * ``to='timm'`` and ``dst`` ending in ``.safetensors``: the state dict alone.
    * ``to='mmseg'`` and ``dst`` ending in ``.pth``: an mmsegmentation 1.x checkpoint (``{'meta', 'state_dict'}``).

    ``card`` adds provenance to a folder's model card: source_url, source_sha256, name, dataset, licence,
    metrics (published scores).
    """
    dst = Path(dst)
    kind = check_output(dst, to, force)
    dt = parse_dtype(dtype)
    check_free_space(dst, output_bytes(res, dt))
    if kind == 'mmseg checkpoint':
        dropped: List[str] = []
        sd = _cast_state_dict(to_mmseg(res, mmseg_drop, dropped), dt)
        meta: Dict[str, Any] = {'twins_timm': {'variant': res.variant, 'task': res.task, 'source_format': res.format}}
        if res.meta.get('class_names'):
            meta['dataset_meta'] = {'classes': res.meta['class_names'], 'palette': res.meta.get('palette')}
        save_torch({'meta': meta, 'state_dict': sd}, dst, force, needed=output_bytes(res, dt))
        return SaveInfo(dst, 'mmseg checkpoint', dst, sha256_file(dst), dropped_parts=dropped)
    if kind == 'safetensors':
        meta_st = {'source_format': res.format, 'variant': res.variant, 'task': res.task,
                   'num_classes': str(res.num_classes), 'model_args': json.dumps(res.model_args)}
        save_safetensors(_cast_state_dict(res.state_dict, dt), dst, force, metadata=meta_st)
        return SaveInfo(dst, 'safetensors', dst, sha256_file(dst))
    model = build_model(res)
    par = reference_parity(res, model) if parity else None
    source_sha = sha256_file(res.source) if res.source and Path(res.source).is_file() else None
    source_sha = (card or {}).get('source_sha256') or source_sha
    model = model if dt is None else model.to(dt)
    if res.is_segmenter:
        hub.save_segmenter_folder(res, model, dst, force, par, source_sha, card, output_bytes(res, dt))
        kind = 'segmenter folder'
    else:
        hub.save_timm_folder(res, model, dst, force, par, source_sha, card, output_bytes(res, dt))
        kind = 'timm folder'
    verify_written(dst / hub.WEIGHTS_NAME, model.state_dict())
    return SaveInfo(dst, kind, dst / hub.WEIGHTS_NAME, sha256_file(dst / hub.WEIGHTS_NAME), par)

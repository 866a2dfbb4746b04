"""Mapping job: detect a checkpoint's format and map every key onto our timm / SMP names (and back to mmseg)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from twins_timm.adapters import ade20k
from twins_timm.convert.build import SEGMENTER_TASKS, target_shapes
from twins_timm.convert.detect import DetectionError, detect, meta_classes, normalize_variant, unwrap
from twins_timm.convert.engine import MappingError, apply_rules
from twins_timm.convert.formats import family_args, get_format, table_for
from twins_timm.convert.read import config_model_args, read_source
from twins_timm.convert.rules import (ENCODER_PREFIX, MMSEG_BACKBONE, PARTS, SEG_BACKBONE_PREFIX, SEG_HEADS,
                                      prefixed)
from twins_timm.files.paths import PathLike


@dataclass
class ConversionResult:
    """A converted checkpoint: target-named tensors plus everything detected about them."""
    state_dict: Dict[str, torch.Tensor]
    format: str
    family: str
    size: str
    variant: str
    task: str
    num_classes: int
    model_args: Dict[str, Any]
    meta: Dict[str, Any] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    dropped_parts: Dict[str, str] = field(default_factory=dict)   # part -> why
    aux_head: bool = False
    source: Optional[str] = None
    wrapper: str = ''
    n_source_keys: int = 0
    n_mapped: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def is_segmenter(self) -> bool:
        return self.task in SEGMENTER_TASKS

    @property
    def n_params(self) -> int:
        return sum(v.numel() for k, v in self.state_dict.items()
                   if v.is_floating_point() and not k.endswith(('running_mean', 'running_var')))



def parse_drop(drop: Union[str, Iterable[str], None]) -> List[str]:
    if not drop:
        return []
    items = drop.split(',') if isinstance(drop, str) else [p for d in drop for p in str(d).split(',')]
    parts = [p.strip().replace('-', '_') for p in items if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError('cannot drop %s: the parts that can be dropped are %s'
                         % (', '.join(map(repr, unknown)), '; '.join('%s = %s' % kv for kv in PARTS.items())))
    return parts



def convert_checkpoint(src: Union[PathLike, Mapping[str, Any]], variant: Optional[str] = None,
                       drop: Union[str, Iterable[str], None] = (), progress: Optional[bool] = None
                       ) -> ConversionResult:
    """Read, detect and map a checkpoint onto our timm backbone or SMP segmenter names.

    ``variant`` (e.g. ``twins_svt_small`` or ``svt-s``) is checked against what the weights are.
    ``drop`` lists parts to leave out (``head``, ``norm``, ``aux_head``). Raises ValueError subclasses
    with a readable message on anything unexpected: foreign or ambiguous files, a wrong variant,
    unmapped / unfilled / misshaped keys.
    """
    obj, source, is_st, folder_cfg = read_source(src, progress)
    sd, wrapper, meta = unwrap(obj)
    det = detect(sd, wrapper, is_safetensors=is_st)
    if variant:
        wanted = normalize_variant(variant)
        if wanted != det.variant:
            raise DetectionError('--variant %s does not match the checkpoint, which is %s (%s, depths %s, widths %s). '
                                 'Leave --variant out to use the detected one, or pick the right file.'
                                 % (wanted, det.variant, det.family.upper(), list(det.depths), list(det.widths)))

    user_drop = parse_drop(drop)
    defaults = get_format(det.format).default_drops.get(det.task, {})
    reasons = {p: 'dropped on request (--drop %s)' % p for p in user_drop}
    for p, why in defaults.items():
        reasons.setdefault(p, why + ' (dropped by default)')
    drop_set = set(reasons)

    task, num_classes, aux = det.task, det.num_classes, det.aux_head
    if 'head' in user_drop and task == 'classification':
        task, num_classes = 'backbone', 0
    if 'aux_head' in drop_set:
        aux = False
    if 'norm' in user_drop and det.task not in SEGMENTER_TASKS:
        raise ValueError('the final norm is part of the timm model; it can only be dropped when writing the '
                         'mmseg format (--to mmseg)')

    if det.format == 'timm':
        model_args = config_model_args(folder_cfg or {}, 'config.json next to %s' % source)
        if model_args is None:
            model_args = family_args('timm', det.variant)
            if any('stage_norms.' in k for k in sd):
                model_args['stage_norm'] = True
                det.notes.append('no config.json next to the weights: per-stage norms inferred from the keys, '
                                 'other numerics settings are timm defaults')
    else:
        model_args = family_args(det.format, det.variant)

    class_names, palette = meta_classes(meta)
    info: Dict[str, Any] = {}
    if det.task in SEGMENTER_TASKS:
        if folder_cfg and 'class_names' in folder_cfg:
            class_names, palette = folder_cfg.get('class_names'), folder_cfg.get('palette')
        if class_names and len(class_names) != num_classes:
            det.notes.append('file lists %d class names for %d classes; names ignored'
                             % (len(class_names), num_classes))
            class_names = None
        if palette and len(palette) != num_classes:
            palette = None
        if class_names is None and num_classes == 150:
            class_names, palette = list(ade20k.CLASSES), [list(p) for p in ade20k.PALETTE]
            det.notes.append('no class names in the file: 150 classes, assumed ADE20K')
        info = {'class_names': class_names, 'palette': palette}

    rules = table_for(det.format, task, det.src_prefix)
    expected = target_shapes(det.variant, task, num_classes, model_args, aux)
    try:
        report = apply_rules(rules, sd, drop=drop_set, expected=expected)
    except MappingError as e:  # say what the file was taken for: often the clue to what is wrong
        raise MappingError('%s looks like a %s %s checkpoint (%s) but %s' % (
            source or 'the state dict', det.variant, task, det.format, e), e.problems) from None
    for p in user_drop:
        if p not in report.dropped_parts:
            raise ValueError('--drop %s: the checkpoint has no %s to drop' % (p, PARTS[p]))
    reasons = {p: reasons[p] for p in report.dropped_parts}
    if task == 'classification' and folder_cfg and folder_cfg.get('label_names'):
        info['label_names'] = folder_cfg['label_names']
    return ConversionResult(
        state_dict=report.state_dict, format=det.format, family=det.family, size=det.size, variant=det.variant,
        task=task, num_classes=num_classes, model_args=model_args, meta=info, dropped=report.dropped,
        dropped_parts=reasons, aux_head=aux, source=source, wrapper=wrapper, n_source_keys=len(sd),
        n_mapped=report.n_mapped, notes=list(det.notes))



def to_mmseg(res: ConversionResult, drop: Union[str, Iterable[str], None] = (),
             report: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """Our state dict back in mmsegmentation 1.x names (the inverse of the mmseg rule table).

    Segmenters become a whole mmseg segmentor (``backbone.`` / ``neck.`` / ``decode_head.`` /
    ``auxiliary_head.``); backbones become an mmseg Twins backbone (no prefix; timm's classifier head
    and final norm have no mmseg slot and must be dropped: ``drop='head,norm'``).
    """
    parts = set(parse_drop(drop))
    if res.is_segmenter:
        rules = prefixed(MMSEG_BACKBONE, SEG_BACKBONE_PREFIX, ENCODER_PREFIX) + SEG_HEADS
    else:
        rules = MMSEG_BACKBONE
    rep = apply_rules(rules, res.state_dict, reverse=True, drop=parts)
    if report is not None:
        report.extend(sorted(rep.dropped_parts))
    return rep.state_dict

"""Tell what a checkpoint is from its keys and shapes alone: format, family, size, task, classes.

Depths come from the block counts per stage, widths from the patch-embedding shapes, SVT vs PCPVT
from the presence of window attention (``attn.qkv``), the task from the decoder keys.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from twins_timm.convert.formats import FORMATS, Evidence, recognise
from twins_timm.convert.rules import ENCODER_PREFIX, SEG_BACKBONE_PREFIX
from twins_timm.models.twins import VARIANTS
TASKS = ('classification', 'backbone', 'fpn', 'upernet')

# (family, depths, widths) -> size; the published Twins configurations (timm / official code).
KNOWN = {
    ('pcpvt', (3, 4, 6, 3), (64, 128, 320, 512)): 'small',
    ('pcpvt', (3, 4, 18, 3), (64, 128, 320, 512)): 'base',
    ('pcpvt', (3, 8, 27, 3), (64, 128, 320, 512)): 'large',
    ('svt', (2, 2, 10, 4), (64, 128, 256, 512)): 'small',
    ('svt', (2, 2, 18, 2), (96, 192, 384, 768)): 'base',
    ('svt', (2, 2, 18, 2), (128, 256, 512, 1024)): 'large',
}

_SHORT = {'s': 'small', 'b': 'base', 'l': 'large'}


class DetectionError(ValueError):
    """The checkpoint is not a (supported) Twins checkpoint, or is ambiguous."""


@dataclass
class Detection:
    format: str
    family: str
    size: str
    task: str
    num_classes: int
    depths: Tuple[int, ...]
    widths: Tuple[int, ...]
    src_prefix: str = ''              # where the backbone sits in the source keys
    aux_head: bool = False
    notes: List[str] = field(default_factory=list)

    @property
    def variant(self) -> str:
        return 'twins_%s_%s' % (self.family, self.size)


def normalize_variant(name: str) -> str:
    """Accept ``twins_svt_small``, ``svt_small``, ``svt-s``, ``SVT-S`` ... -> ``twins_svt_small``."""
    n = name.strip().lower().replace('-', '_')
    n = n[len('twins_'):] if n.startswith('twins_') else n
    n = n.replace('alt_gvt', 'svt')
    parts = n.split('_')
    if len(parts) == 2 and parts[0] in ('svt', 'pcpvt'):
        size = _SHORT.get(parts[1], parts[1])
        v = 'twins_%s_%s' % (parts[0], size)
        if v in VARIANTS:
            return v
    raise DetectionError('unknown variant %r; use one of %s' % (name, ', '.join(VARIANTS)))


# ----------------------------------------------------------------------------------- unwrapping
def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def unwrap(obj: Any) -> Tuple[Dict[str, torch.Tensor], str, Dict[str, Any]]:
    """Find the state dict inside a loaded file: returns (state_dict, wrapper key or '', meta)."""
    if not isinstance(obj, Mapping):
        raise DetectionError('the file holds a %s, not a state dict; expected a dict of tensors or a '
                             "training checkpoint wrapping one ('model' / 'state_dict')" % type(obj).__name__)
    wrapper, sd = '', obj
    if not _is_state_dict(obj):
        for key in ('state_dict', 'model', 'module', 'model_state'):
            if key in obj and isinstance(obj[key], Mapping):
                wrapper, sd = key, obj[key]
                break
        else:
            raise DetectionError('no state dict found in the file (top-level keys: %s); expected a dict of '
                                 "tensors or one under 'model' / 'state_dict'" % ', '.join(map(str, list(obj)[:10])))
        tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        if not tensors:
            raise DetectionError("the file's %r entry holds no tensors" % wrapper)
        sd = tensors
    keys = list(sd)
    if keys and all(k.startswith('module.') for k in keys):  # DataParallel / DDP
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    meta = obj.get('meta') if wrapper else None
    return dict(sd), wrapper, dict(meta) if isinstance(meta, Mapping) else {}


def meta_classes(meta: Mapping[str, Any]) -> Tuple[Optional[List[str]], Optional[List[List[int]]]]:
    """Class names and palette stored by mmseg 0.x (CLASSES/PALETTE) or 1.x (dataset_meta)."""
    dm = meta.get('dataset_meta') if isinstance(meta.get('dataset_meta'), Mapping) else {}
    names = meta.get('CLASSES') or dm.get('classes')
    palette = meta.get('PALETTE') or dm.get('palette')
    names = [str(n) for n in names] if names else None
    palette = [[int(c) for c in p] for p in palette] if palette else None
    return names, palette


# ------------------------------------------------------------------------------------ detection
def _foreign_hint(keys: List[str]) -> str:
    joined = '\n'.join(keys)
    hints = [
        (r'^(\w+\.)*layer1\.0\.conv1\.weight$', 'a ResNet'),
        (r'relative_position_bias_table', 'a Swin Transformer'),
        (r'(^|\.)cls_token$|pos_embed$', 'a ViT/DeiT-style transformer'),
        (r'(^|\.)stages\.\d+\.', 'a ConvNeXt/other staged CNN'),
        (r'(^|\.)block\d\.\d+\.', 'a PVT / SegFormer (MiT)'),
    ]
    for pattern, name in hints:
        if re.search(pattern, joined, re.M):
            return ' It looks like %s checkpoint.' % name
    return ''


def _backbone_layout(keys: List[str]) -> Dict[str, Tuple[str, str]]:
    """Backbone layouts found: name -> (format guess, prefix)."""
    found = {}
    for k in keys:
        m = re.match(r'^(.*?)(blocks|layers)\.\d+\.\d+\.', k)
        if not m:
            continue
        prefix, kind = m.group(1), m.group(2)
        if kind == 'layers':
            found.setdefault('mmseg:' + prefix, ('mmseg', prefix))
        elif prefix == ENCODER_PREFIX:
            found.setdefault('segmenter:' + prefix, ('timm', prefix))
        elif prefix in ('', SEG_BACKBONE_PREFIX):
            found.setdefault('official:' + prefix, ('official', prefix))
        else:
            found.setdefault('other:' + prefix, ('other', prefix))
    return found


def detect(sd: Mapping[str, torch.Tensor], wrapper: str = '', is_safetensors: bool = False) -> Detection:
    """Detect format, family, size, task and number of classes; raise DetectionError if not Twins."""
    keys = list(sd)
    layouts = _backbone_layout(keys)
    twins_like = any(re.search(r'(^|\.)patch_embeds\.0\.(proj|projection)\.weight$', k) for k in keys)
    if not layouts or not twins_like:
        raise DetectionError('this is not a Twins checkpoint: no Twins backbone keys (patch_embeds.N.proj, '
                             'blocks.N.M / layers.N.M) were found among its %d keys (first: %s).%s Only Twins '
                             'PCPVT/SVT checkpoints can be converted.'
                             % (len(keys), ', '.join(keys[:4]), _foreign_hint(keys)))
    if len(layouts) > 1 or next(iter(layouts.values()))[0] == 'other':
        raise DetectionError('ambiguous checkpoint: it mixes several backbone layouts (%s); convert a file '
                             'holding one model' % ', '.join(sorted(p or '<no prefix>' for _, p in layouts.values())))
    kind, prefix = next(iter(layouts.values()))
    block = 'layers' if kind == 'mmseg' else 'blocks'
    pe = 'projection' if kind == 'mmseg' else 'proj'

    # depths and widths
    depth: Dict[int, int] = {}
    for k in keys:
        m = re.match(r'^%s%s\.(\d+)\.(\d+)\.' % (re.escape(prefix), block), k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            depth[i] = max(depth.get(i, 0), j + 1)
    n_stages = max(depth) + 1
    depths = tuple(depth.get(i, 0) for i in range(n_stages))
    widths = []
    for i in range(n_stages):
        w = sd.get('%spatch_embeds.%d.%s.weight' % (prefix, i, pe))
        widths.append(int(w.shape[0]) if w is not None else 0)
    widths = tuple(widths)
    window = any(re.match(r'^%s%s\.\d+\.\d+\.attn\.qkv\.weight$' % (re.escape(prefix), block), k) for k in keys)
    family = 'svt' if window else 'pcpvt'
    size = KNOWN.get((family, depths, widths))
    if size is None:
        raise DetectionError('unsupported Twins configuration: %s with depths %s and widths %s matches none of '
                             'the published variants (%s)' % (family.upper(), list(depths), list(widths),
                                                               ', '.join(VARIANTS)))

    # format: the first record (formats.py) that recognises the evidence
    evidence = Evidence(layout=kind, prefix=prefix, keys=tuple(keys), wrapper=wrapper, is_safetensors=is_safetensors,
                        segmentor=any(k.startswith(('decode_head.', 'neck.')) for k in keys))
    found = recognise(evidence)
    if found is None:  # pragma: no cover - the records cover every layout detection yields
        raise DetectionError('a Twins checkpoint in no known format (%s)' % ', '.join(FORMATS))
    fmt = found.name

    # task and classes
    aux = False
    notes: List[str] = []
    if fmt == 'timm' and prefix == ENCODER_PREFIX:
        dec, head_w, aux_w = 'decoder.', 'segmentation_head.conv_seg.weight', 'aux_head.conv_seg.weight'
        neck = 'decoder.neck.'
    else:
        dec, head_w, aux_w = 'decode_head.', 'decode_head.conv_seg.weight', 'auxiliary_head.conv_seg.weight'
        neck = 'neck.'
    has_psp = any(k.startswith(dec + 'psp_modules.') for k in keys)
    has_fpn = any(k.startswith(neck) for k in keys) and any(k.startswith(dec + 'scale_heads.') for k in keys)
    has_dec = any(k.startswith(dec) and not k.startswith(neck) for k in keys) or head_w in sd
    if has_psp and has_fpn:
        raise DetectionError('ambiguous checkpoint: it has both UPerNet (psp_modules) and FPN (neck, scale_heads) '
                             'decoder keys')
    if has_psp or has_fpn:
        task = 'upernet' if has_psp else 'fpn'
        if head_w not in sd:
            raise DetectionError('segmentation checkpoint without its classifier (%s); the file looks incomplete'
                                 % head_w)
        num_classes = int(sd[head_w].shape[0])
        aux = aux_w in sd
    elif has_dec:
        raise DetectionError('the checkpoint has a decode head of an unsupported type (keys like %s); supported '
                             'decoders are UPerHead (UPerNet) and FPN' %
                             ', '.join([k for k in keys if k.startswith(dec)][:3]))
    else:
        head = sd.get(prefix + 'head.weight')
        if fmt == 'official_seg' or head is None:
            task = 'backbone'
            num_classes = 0
        else:
            task = 'classification'
            num_classes = int(head.shape[0])
    return Detection(format=fmt, family=family, size=size, task=task, num_classes=num_classes,
                     depths=depths, widths=widths, src_prefix=prefix, aux_head=aux, notes=notes)

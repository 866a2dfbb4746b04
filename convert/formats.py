"""One record per checkpoint format: everything the converter knows about it, in one place.

A new format is one ``Format`` here (plus a manifest under tests/fixtures/manifests for its tests):
its name, what it is, how detection recognises it, its rule table, the parts dropped by default and its
display name. The backbone arguments that reproduce its numerics (see shared FORMATS.md) are a fact about
the model, so they sit beside it under the same name: ``twins_timm.models.families.FAMILY_ARGS``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from twins_timm.convert.rules import (ENCODER_PREFIX, MMSEG_BACKBONE, MMSEG_PRETRAIN_BACKBONE, OFFICIAL_SEG_BACKBONE,
                                      SEG_HEADS, SEGMENTER_IDENTITY, TIMM_BACKBONE, Rule, prefixed)
from twins_timm.models.families import checkpoint_family_args

# The evidence detection gathers about a file, handed to each format's ``recognises``.
#   layout: 'timm' (blocks.*, under encoder.model. or nothing), 'official' (blocks.*, bare or backbone.),
#           'mmseg' (layers.*); prefix: where the backbone sits; keys; wrapper: '' or 'model' / 'state_dict' ...;
#   is_safetensors; segmentor: decoder keys (neck. / decode_head.) present.


@dataclass(frozen=True)
class Evidence:
    layout: str
    prefix: str
    keys: Tuple[str, ...]
    wrapper: str = ''
    is_safetensors: bool = False
    segmentor: bool = False

    def has(self, key: str) -> bool:
        return key in self._keyset

    @property
    def _keyset(self) -> frozenset:
        return frozenset(self.keys)

    def any_key(self, needle: str) -> bool:
        return any(needle in k for k in self.keys)


@dataclass(frozen=True)
class Format:
    name: str
    display: str                                   # what model cards and summaries call it
    description: str
    recognises: Callable[[Evidence], bool]         # tried in FORMATS order; the first that says yes wins
    backbone_rules: Tuple[Rule, ...]               # source backbone names <-> timm names
    # task -> {part: why}: what the files hold that the target never uses
    default_drops: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def args_for(self, variant: str) -> Dict[str, Any]:
        """Backbone kwargs reproducing this format's computation for ``variant``."""
        return checkpoint_family_args(self.name, variant)


_UNUSED_HEAD = 'unused classification head of a segmentation backbone'
_UNUSED_NORM = 'unused final norm of a segmentation backbone'

FORMATS: Dict[str, Format] = {f.name: f for f in (
    Format(
        'mmseg_pretrain', 'mmsegmentation ImageNet-pretrained backbone (tools/model_converters/twins2mmseg.py)',
        "official ImageNet classifier renamed by mmseg's twins2mmseg.py: mmseg backbone names, no head, the "
        "classifier's final norm kept, a bare state dict (mmsegmentation/v0.5/pretrain/twins/*.pth)",
        recognises=lambda e: (e.layout == 'mmseg' and e.prefix == '' and e.has('norm.weight')
                              and not e.any_key('norm_list.')),
        backbone_rules=MMSEG_PRETRAIN_BACKBONE),
    Format(
        'mmseg', 'mmsegmentation checkpoint',
        'mmsegmentation Twins segmentor (0.x >= 0.20 or 1.x) or bare mmseg backbone: layers.*, projection, '
        'position_encodings, nn.MultiheadAttention in_proj',
        recognises=lambda e: e.layout == 'mmseg',
        backbone_rules=MMSEG_BACKBONE),
    Format(
        'timm', 'timm state dict',
        'timm Twins names (bare or in .safetensors), or our SMP segmenter (encoder.model.*)',
        recognises=lambda e: e.layout == 'timm' or (
            e.layout == 'official' and e.prefix == '' and not e.segmentor and not e.any_key('norm_list.')
            and (e.is_safetensors or not e.wrapper)),
        backbone_rules=TIMM_BACKBONE),
    Format(
        'official_seg', 'official Twins segmentation checkpoint (Meituan-AutoML/Twins, mmseg 0.x)',
        'segmentors of the official Twins repo (mmseg 0.x): backbone.* with timm names, norm_list (SVT)',
        recognises=lambda e: e.layout == 'official' and (e.prefix == 'backbone.' or e.segmentor
                                                         or e.any_key('norm_list.')),
        backbone_rules=OFFICIAL_SEG_BACKBONE,
        default_drops={'fpn': {'head': _UNUSED_HEAD, 'norm': _UNUSED_NORM},
                       'upernet': {'head': _UNUSED_HEAD, 'norm': _UNUSED_NORM},
                       'backbone': {'head': _UNUSED_HEAD}}),
    Format(
        'official_cls', 'official Twins classification checkpoint (Meituan-AutoML/Twins)',
        "ImageNet classifiers of the official Twins repo, wrapped by its training script ({'model': sd})",
        recognises=lambda e: e.layout == 'official' and e.prefix == '',
        backbone_rules=TIMM_BACKBONE),
)}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f'unknown checkpoint family (format) {name!r}; expected one of {sorted(FORMATS)}')
    return FORMATS[name]


def recognise(evidence: Evidence) -> Optional[Format]:
    return next((f for f in FORMATS.values() if f.recognises(evidence)), None)


def family_args(fmt: str, variant: str) -> Dict[str, Any]:
    """Backbone kwargs reproducing the computation of checkpoint format ``fmt`` for ``variant``."""
    return get_format(fmt).args_for(variant)


def table_for(fmt: str, task: str, src_prefix: str = '') -> Tuple[Rule, ...]:
    """The rule table converting a checkpoint of format ``fmt`` holding a model for ``task``.

    ``src_prefix`` is where the backbone sits in the source (``backbone.`` in mmseg segmentors).
    Classification / backbone tasks target bare timm names; fpn / upernet target the segmenter.
    """
    table = get_format(fmt).backbone_rules
    segmenter = task in ('fpn', 'upernet')
    if fmt == 'timm' and segmenter:
        return SEGMENTER_IDENTITY
    backbone = prefixed(table, src_prefix, ENCODER_PREFIX if segmenter else '')
    return backbone + (SEG_HEADS if segmenter else ())

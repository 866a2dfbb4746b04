"""Key-mapping rules as data; each format's record (``formats.py``) names its backbone table.

A rule maps a *source-side* key pattern to a *target-side* (timm / SMP) pattern. Patterns use
placeholders: ``{i}``, ``{j}``, ``{k}`` (an index), ``{w}`` (``weight`` or ``bias``), ``{x}`` (any
rest). Tables are ordered: the first rule whose pattern matches a key handles it, in either
direction (the engine in ``engine.py`` applies the same table source->target and target->source).

``part`` names an optional piece (``head``, ``norm``, ``aux_head``) that the user may drop; keys of a
dropped part are removed and reported instead of mapped. A side that is ``None`` means "this key has
no slot on that side": it can only be dropped, never mapped.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union


@dataclass(frozen=True)
class Rename:
    """One source key <-> one target key."""
    src: Optional[str]
    dst: Optional[str]
    part: Optional[str] = None
    # (source-side template, target-side template): the rule applies only where the key named by the
    # template of the side being read exists. Used where one target name has two possible sources.
    when: Optional[Tuple[str, str]] = None


@dataclass(frozen=True)
class Split:
    """One source key <-> several target keys, cut along dim 0 in proportion to ``chunks``.

    mmseg's ``nn.MultiheadAttention.in_proj_*`` stacks rows ``[q; k; v]``; timm keeps ``q`` (1 part)
    and ``kv`` (2 parts). The inverse concatenates in the listed order.
    """
    src: str
    dst: Tuple[str, ...]
    chunks: Tuple[int, ...]
    part: Optional[str] = None


Rule = Union[Rename, Split]

# Parts the user may drop (``--drop``), with what they are.
PARTS = {
    'head': 'classification head (head.*)',
    'norm': 'final LayerNorm of the classifier (norm.*)',
    'aux_head': 'auxiliary FCN head used only for training (auxiliary_head.*)',
}

# ------------------------------------------------------------------------------------ backbones
# Official classification / timm: identical names.
TIMM_BACKBONE = (
    Rename('head.{w}', 'head.{w}', part='head'),
    Rename('norm.{w}', 'norm.{w}', part='norm'),
    Rename('{x}', '{x}'),
)

# Official segmentation (mmseg 0.x, Twins repo): timm names plus SVT's per-stage norms.
OFFICIAL_SEG_BACKBONE = (
    Rename('norm_list.{i}.{w}', 'stage_norms.{i}.{w}'),
    Rename('head.{w}', 'head.{w}', part='head'),
    Rename('norm.{w}', 'norm.{w}', part='norm'),
    Rename('{x}', '{x}'),
)

# mmsegmentation 1.x (backbone converted by mmseg's twins2mmseg).
MMSEG_BACKBONE = (
    Rename('patch_embeds.{i}.projection.{w}', 'patch_embeds.{i}.proj.{w}'),
    Rename('patch_embeds.{i}.norm.{w}', 'patch_embeds.{i}.norm.{w}'),
    Split('layers.{i}.{j}.attn.attn.in_proj_{w}',
          ('blocks.{i}.{j}.attn.q.{w}', 'blocks.{i}.{j}.attn.kv.{w}'), chunks=(1, 2)),
    Rename('layers.{i}.{j}.attn.attn.out_proj.{w}', 'blocks.{i}.{j}.attn.proj.{w}',
           when=('layers.{i}.{j}.attn.attn.in_proj_weight', 'blocks.{i}.{j}.attn.q.weight')),
    Rename('layers.{i}.{j}.ffn.layers.0.0.{w}', 'blocks.{i}.{j}.mlp.fc1.{w}'),
    Rename('layers.{i}.{j}.ffn.layers.1.{w}', 'blocks.{i}.{j}.mlp.fc2.{w}'),
    # norm1, norm2, attn.sr, attn.norm, window attn.qkv / attn.proj
    Rename('layers.{i}.{j}.{x}', 'blocks.{i}.{j}.{x}'),
    Rename('position_encodings.{i}.proj.{w}', 'pos_block.{i}.proj.0.{w}'),
    Rename('norm_list.{i}.{w}', 'stage_norms.{i}.{w}'),
    # timm-only keys: no mmseg slot, so going timm -> mmseg they must be dropped explicitly
    Rename(None, 'head.{w}', part='head'),
    Rename(None, 'norm.{w}', part='norm'),
)

# mmseg's ImageNet backbones (mmsegmentation/v0.5/pretrain/twins/*.pth, made by its twins2mmseg.py from the
# official classifiers): mmseg names, no head, but the classifier's final norm kept.
MMSEG_PRETRAIN_BACKBONE = MMSEG_BACKBONE[:-2] + (
    Rename(None, 'head.{w}', part='head'),
    Rename('norm.{w}', 'norm.{w}', part='norm'),
)

# ------------------------------------------------------------------------------ decoder heads
# Shared by official segmentation and mmseg (both are mmseg segmentors); targets are the adapter's names.
SEG_HEADS = (
    Rename('neck.{x}', 'decoder.neck.{x}'),
    Rename('decode_head.conv_seg.{w}', 'segmentation_head.conv_seg.{w}'),
    Rename('decode_head.{x}', 'decoder.{x}'),
    Rename('auxiliary_head.{x}', 'aux_head.{x}', part='aux_head'),
)

# Our own SMP segmenter state dict (passed through, aux head droppable).
SEGMENTER_IDENTITY = (
    Rename('aux_head.{x}', 'aux_head.{x}', part='aux_head'),
    Rename('{x}', '{x}'),
)

ENCODER_PREFIX = 'encoder.model.'   # where the adapter keeps the timm backbone
SEG_BACKBONE_PREFIX = 'backbone.'   # where mmseg segmentors keep it


def prefixed(rules: Sequence[Rule], src_prefix: str, dst_prefix: str) -> Tuple[Rule, ...]:
    """The same rules with a prefix on each side (e.g. ``backbone.`` -> ``encoder.model.``)."""
    def p(t: Optional[str], pre: str) -> Optional[str]:
        return None if t is None else pre + t

    out = []
    for r in rules:
        if isinstance(r, Split):
            out.append(replace(r, src=p(r.src, src_prefix), dst=tuple(p(d, dst_prefix) for d in r.dst)))
        else:
            when = None if r.when is None else (p(r.when[0], src_prefix), p(r.when[1], dst_prefix))
            out.append(replace(r, src=p(r.src, src_prefix), dst=p(r.dst, dst_prefix), when=when))
    return tuple(out)

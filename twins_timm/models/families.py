"""Which Twins options reproduce each checkpoint family's numerics (shared FORMATS.md).

The facts sit beside the model they configure, so the model needs nothing above it; the converter's format
records (``twins_timm.convert.formats``) refer to them by family name.
"""
from typing import Any, Dict, Mapping

__all__ = ['FAMILY_ARGS', 'architecture', 'checkpoint_family_args']

# checkpoint family -> architecture ('pcpvt' / 'svt') -> Twins kwargs; an architecture left out uses timm's
# defaults. Every family the converter knows is a key, also those that need nothing.
FAMILY_ARGS: Mapping[str, Mapping[str, Mapping[str, Any]]] = {
    'timm': {},
    'official_cls': {},
    'official_seg': {'svt': dict(stage_norm=True, window_mask=True)},
    'mmseg': {'svt': dict(stage_norm=True, norm_eps=1e-5, window_mask=True, patch_padding='corner'),
              'pcpvt': dict(norm_eps=1e-5, patch_padding='corner')},
    'mmseg_pretrain': {},
}


def architecture(variant: str) -> str:
    """'pcpvt' or 'svt' for a Twins variant name (twins_pcpvt_* / twins_svt_*)."""
    arch = 'svt' if '_svt_' in variant else 'pcpvt' if '_pcpvt_' in variant else None
    if arch is None:
        raise ValueError(f'{variant!r} is not a Twins variant (twins_pcpvt_* / twins_svt_*)')
    return arch


def checkpoint_family_args(family: str, variant: str) -> Dict[str, Any]:
    """Model kwargs reproducing ``family`` ('timm', 'official_cls', 'official_seg', 'mmseg', 'mmseg_pretrain')."""
    if family not in FAMILY_ARGS:
        raise ValueError(f'unknown checkpoint family (format) {family!r}; expected one of {sorted(FAMILY_ARGS)}')
    return dict(FAMILY_ARGS[family].get(architecture(variant), {}))

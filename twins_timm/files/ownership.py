"""What marks an output as twins-timm's own: ``--force`` replaces only such an output, never a user's file.

Each ``*_not_ours(path)`` says why ``path`` is not an earlier output of ours (None: it is one, and replacing it
loses nothing else); the writers (``twins_timm.files.atomic``) and the commands' checks take them as arguments.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from safetensors import safe_open

from twins_timm.files.checkpoint import torch_load_safely

__all__ = ['HUB_FOLDER_FILES', 'OUR_FOLDER_FILES', 'OUR_SEGMENTER_CLASSES', 'SAFETENSORS_FORMAT', 'folder_not_ours',
           'hub_folder_not_ours', 'safetensors_not_ours', 'mmseg_not_ours']

# Every folder twins-timm writes holds only these files (Hub folders from `convert` and the zoo cache; training
# checkpoints add theirs), and its config.json names a twins-timm model: a timm folder from `convert` carries a
# 'twins_timm' entry, a segmenter folder the adapter class that save_pretrained records.
HUB_FOLDER_FILES = frozenset({'config.json', 'model.safetensors', 'README.md'})
OUR_FOLDER_FILES = HUB_FOLDER_FILES | {'recipe.json', 'training_state.pt'}
OUR_SEGMENTER_CLASSES = frozenset({'TwinsUPerNet', 'TwinsFPN'})
SAFETENSORS_FORMAT = 'twins_timm'  # the 'format' metadata of a .safetensors file that `convert` writes


def folder_not_ours(path: Path, names: frozenset = OUR_FOLDER_FILES) -> Optional[str]:
    """Why ``path`` is not a folder twins-timm wrote, holding only ``names`` (None: it is one, and replacing it
    loses nothing else)."""
    if not path.is_dir() or path.is_symlink():
        return 'not a folder'
    entries = sorted(path.iterdir())
    foreign = [p.name for p in entries if p.name not in names or p.is_symlink() or not p.is_file()]
    if foreign:
        return 'it holds %s' % ', '.join(foreign[:3]) + (', ...' if len(foreign) > 3 else '')
    try:
        cfg = json.loads((path / 'config.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return 'it has no readable config.json'
    if not isinstance(cfg, dict) or not ('twins_timm' in cfg or cfg.get('_model_class') in OUR_SEGMENTER_CLASSES):
        return 'its config.json is not that of a twins-timm model'
    return None


def hub_folder_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not a Hub folder that `convert` (or the zoo) wrote: a training checkpoint is not one."""
    return folder_not_ours(path, HUB_FOLDER_FILES)


def safetensors_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not a .safetensors file that `twins-timm convert` wrote (its metadata says so)."""
    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
    except Exception:  # safetensors raises its own error types for foreign files
        return 'not a safetensors file'
    return None if meta.get('format') == SAFETENSORS_FORMAT else 'no twins-timm metadata in it'


def mmseg_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not an mmseg checkpoint that `twins-timm convert --to mmseg` wrote."""
    try:
        obj = torch_load_safely(path)
    except Exception:  # anything torch cannot read safely is not ours
        return 'not a checkpoint twins-timm can read safely'
    ours = isinstance(obj, dict) and set(obj) == {'meta', 'state_dict'} and isinstance(obj['meta'], dict) \
        and isinstance(obj['meta'].get('twins_timm'), dict)
    return None if ours else 'no twins-timm entry in its meta'

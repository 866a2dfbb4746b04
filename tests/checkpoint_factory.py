"""Test checkpoints in each source format, made from tests/fixtures/manifests with seeded random values.

Names, shapes and order come from the manifests (the real files' state dicts); values are random but
sane (norm weights near 1, BN running variances positive, fan-in scaled weights) so forward passes
stay finite. Wrappers mimic the real files: official classification ``{'model': sd}`` (optionally
with an ``argparse.Namespace`` and optimizer state, as the training script saves), official
segmentation and mmseg ``{'meta': {...}, 'state_dict': sd}`` (CLASSES / PALETTE in official meta).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Optional

import torch

MANIFESTS = Path(__file__).parent / 'fixtures' / 'manifests'
NUM_CLASSES_SEG = 150


def manifest_names():
    """'official/alt_gvt_small', 'mmseg/twins_svt-s_fpn_ade20k', ... for every manifest."""
    return sorted('%s/%s' % (p.parent.name, p.stem) for p in MANIFESTS.glob('*/*.json'))


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / (name + '.json')).read_text())


def kind_of(name: str) -> str:
    """'official_cls' | 'official_seg' | 'mmseg' | 'mmseg_pretrain' from the manifest's format string."""
    fmt = manifest(name)['format']
    if fmt.startswith('mmsegmentation ImageNet pretrain'):
        return 'mmseg_pretrain'
    if fmt.startswith('mmsegmentation'):
        return 'mmseg'
    return 'official_cls' if fmt == 'twins-official-classification' else 'official_seg'


def shapes_only(name: str) -> Dict[str, torch.Tensor]:
    """Meta tensors with the manifest's names and shapes (no memory, for detection / mapping tests)."""
    return {k: torch.empty(v, device='meta', dtype=torch.int64 if k.endswith('num_batches_tracked') else None)
            for k, v in manifest(name)['keys'].items()}


def random_state_dict(name: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in manifest(name)['keys'].items():
        if key.endswith('num_batches_tracked'):
            out[key] = torch.tensor(1000, dtype=torch.int64)
        elif key.endswith('running_var'):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith('running_mean'):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif key.endswith('bias'):
            out[key] = 0.02 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # LayerNorm / BatchNorm weight
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def class_meta(n: int = NUM_CLASSES_SEG, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    names = tuple('class_%03d' % i for i in range(n))
    palette = torch.randint(0, 256, (n, 3), generator=g).tolist()
    return names, palette


def wrap(name: str, sd: Dict[str, torch.Tensor], training_extras: bool = False) -> dict:
    """The object the real file of this manifest holds."""
    kind = kind_of(name)
    if kind == 'mmseg_pretrain':  # twins2mmseg saves the bare state dict
        return dict(sd)
    if kind == 'official_cls':
        obj = {'model': sd}
        if training_extras:  # what the official main.py saves
            first = next(iter(sd.values()))
            obj['optimizer'] = {'state': {0: {'step': torch.tensor(10.0), 'exp_avg': torch.zeros_like(first)}},
                                'param_groups': [{'lr': 1e-3, 'weight_decay': 0.05, 'params': [0]}]}
            obj['lr_scheduler'] = {'last_epoch': 300, 'base_lrs': [1e-3]}
            obj['epoch'] = 299
            obj['args'] = argparse.Namespace(model=name.split('/')[-1], batch_size=128, lr=1e-3,
                                             input_size=224, output_dir='/tmp/out', dist_eval=True)
        return obj
    if kind == 'official_seg':
        names, palette = class_meta()
        meta = {'mmseg_version': '0.11.0+', 'config': '# %s config' % name, 'CLASSES': names, 'PALETTE': palette}
        obj = {'meta': meta, 'state_dict': sd}
        if training_extras:
            obj['optimizer'] = {'state': {}, 'param_groups': [{'lr': 6e-5, 'params': []}]}
        return obj
    return {'meta': {'mmseg_version': '1.2.2', 'epoch': 0, 'iter': 160000}, 'state_dict': sd}


def write_checkpoint(name: str, path, seed: int = 0, training_extras: bool = False,
                     sd: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Save a random checkpoint of manifest ``name`` at ``path`` in its source format; returns the path."""
    path = Path(path)
    sd = random_state_dict(name, seed) if sd is None else sd
    torch.save(wrap(name, sd, training_extras), path)
    return path


def twins2mmseg(sd: Dict[str, torch.Tensor], family: str) -> Dict[str, torch.Tensor]:
    """What mmseg's tools/model_converters/twins2mmseg.py (``convert_twins``) makes of an official classifier.

    Its output is the format of mmseg's published ImageNet backbones (mmsegmentation/v0.5/pretrain/twins/
    *.pth, format ``mmseg_pretrain``): mmseg names, ``head.*`` left out, the final ``norm.*`` kept, q and
    kv stacked into ``attn.in_proj_*``, saved as a bare state dict. Same rules, written here.
    """
    out = {}
    for k, v in sd.items():
        new_k, new_v = k, v
        if k.startswith('head'):
            continue
        if k.startswith('patch_embeds'):
            new_k = k.replace('proj.', 'projection.') if 'proj.' in k else k
        elif k.startswith('blocks'):
            if 'attn.q.' in k:
                new_k = k.replace('q.', 'attn.in_proj_')
                new_v = torch.cat([v, sd[k.replace('attn.q.', 'attn.kv.')]], dim=0)
            elif 'mlp.fc1' in k:
                new_k = k.replace('mlp.fc1', 'ffn.layers.0.0')
            elif 'mlp.fc2' in k:
                new_k = k.replace('mlp.fc2', 'ffn.layers.1')
            elif 'attn.proj.' in k and (family == 'pcpvt' or int(k.split('.')[2]) % 2 == 1):
                new_k = k.replace('proj.', 'attn.out_proj.')  # global (sub-sampled) attention: nn.MultiheadAttention
            new_k = new_k.replace('blocks.', 'layers.')
        elif k.startswith('pos_block'):
            new_k = k.replace('pos_block', 'position_encodings').replace('proj.0.', 'proj.')
        if 'attn.kv.' not in k:
            out[new_k] = new_v
    return out

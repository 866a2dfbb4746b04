"""Test helpers for the tools: a tiny segmenter that follows the segmenter contract, and mmseg.

The stand-in takes normalised NCHW input and returns logits at the input size, like
TwinsUPerNet / TwinsFPN in eval mode, and carries classes / class_names / palette / mean / std.
It mixes in a global context term so that a crop's logits depend on the whole crop (sliding
window and whole-image inference then differ, and the tests can tell them apart).
"""
from __future__ import annotations

import sys
from pathlib import Path
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def random_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An (h, w, 3) uint8 photo of seeded noise."""
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def region_logits(classes: int, h: int, w: int, regions=(6, 8), seed: int = 0) -> torch.Tensor:
    """(1, classes, h, w) logits like a segmenter's: one class leads in each of a grid of regions, with
    smooth borders (bilinear from a quarter of the size, as the decoders' outputs) and some noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, classes, h // 4, w // 4, generator=g) * 1.5
    lead = torch.randint(0, classes, (1, 1) + tuple(regions), generator=g).float()
    lead = F.interpolate(lead, size=coarse.shape[-2:], mode='nearest').long()[0]
    coarse[0].scatter_add_(0, lead, torch.full(lead.shape, 6.0))
    return F.interpolate(coarse, size=(h, w), mode='bilinear', align_corners=False)


class TinySegmenter(nn.Module):
    def __init__(self, classes: int = 5, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, classes, 3, padding=1)
        self.context = nn.Linear(8, classes)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.classes = classes
        self.class_names = ['class_%d' % i for i in range(classes)]
        self.palette = [[(37 * i) % 256, (91 * i) % 256, (151 * i) % 256] for i in range(classes)]
        self.mean = (123.675, 116.28, 103.53)
        self.std = (58.395, 57.12, 57.375)
        self.calls = []  # (batch, H, W, inference_mode) per forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], x.shape[2], x.shape[3], torch.is_inference_mode_enabled()))
        f = F.relu(self.conv1(x))
        out = self.conv2(f) + self.context(f.mean(dim=(2, 3)))[:, :, None, None]
        return F.interpolate(out, size=x.shape[-2:], mode='bilinear', align_corners=False)


class OpsSeen(TorchDispatchMode):
    """Records the operations run and the largest tensor any of them makes (elements): the merge's work
    is linear in pixels when no matrix product runs, and its temporaries are bounded by ``largest``."""

    def __init__(self):
        super().__init__()
        self.largest, self.names = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


# operations that would make a resize quadratic (a dense weight matrix per axis)
MATRIX_PRODUCTS = {'mm', 'bmm', 'matmul', 'einsum', 'addmm', 'baddbmm'}


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random uint8-valued 1x3xHxW image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, h, w), generator=g, dtype=torch.uint8)


def require_mmseg():
    """Import mmseg (skip without it) with a stand-in ``mmcv.ops`` (mmcv-lite has no ops)."""
    for name in ('mmengine', 'mmcv', 'mmseg'):
        pytest.importorskip(name)
    if 'mmcv.ops' not in sys.modules:
        ops = types.ModuleType('mmcv.ops')

        def missing(*args, **kwargs):
            raise NotImplementedError('mmcv.ops is a test stand-in')
        for name in ('point_sample', 'sigmoid_focal_loss', 'CrissCrossAttention', 'PSAMask',
                     'DeformConv2d', 'ModulatedDeformConv2d'):
            setattr(ops, name, missing)
        sys.modules['mmcv.ops'] = ops
        import mmcv
        mmcv.ops = ops
    import mmseg.models  # noqa: F401
    return mmseg


def ade_folder(root: Path, n: int, classes: int, size=(24, 32)) -> Path:
    """An ADE20K-format validation folder of ``n`` random images with annotations 0 (other) .. ``classes``."""
    rng = np.random.default_rng(3)
    (root / 'images' / 'validation').mkdir(parents=True)
    (root / 'annotations' / 'validation').mkdir(parents=True)
    for k in range(n):
        Image.fromarray(random_rgb(*size, seed=10 + k)).save(root / 'images' / 'validation' / ('img_%d.jpg' % k))
        ann = rng.integers(0, classes + 1, size).astype(np.uint8)  # 0 = other, 1..classes
        Image.fromarray(ann).save(root / 'annotations' / 'validation' / ('img_%d.png' % k))
    return root

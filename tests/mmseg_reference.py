"""mmsegmentation 1.x reference models on CPU, for parity tests only.

Built by the package's one builder (`twins_timm.devtools.mmseg_reference`, shared with `twins-timm bench`:
mmseg's own Twins configs, SyncBN replaced by BN, the `mmcv.ops` stand-in for mmcv-lite), then given
seeded random weights (`references.randomize_`: BatchNorm running statistics included) and eval mode.

Tests call `require_mmseg()` first: it skips the test when mmseg is not installed.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from builders import fill_
from references import no_parameter_init, randomize_
from twins_timm.adapters.hub import HEADS
from twins_timm.devtools.mmseg_reference import FAMILIES, SIZES, config_path, import_mmseg
from twins_timm.devtools.mmseg_reference import model_config as _model_config

__all__ = ['FAMILIES', 'HEADS', 'SIZES', 'config_path', 'require_mmseg', 'model_config', 'randomize_',
           'build_reference', 'mmseg_checkpoint_object', 'save_mmseg_checkpoint', 'reference_logits',
           'reference_features']


def require_mmseg():
    """Import mmseg's models with the stand-in in place; skip the calling test without mmseg."""
    pytest.importorskip('mmengine')
    pytest.importorskip('mmcv')
    pytest.importorskip('mmseg')
    return import_mmseg()


def model_config(family: str, size: str, head: str) -> dict:
    """The `model` dict of mmseg's config, ready to build on CPU without downloads."""
    require_mmseg()
    return _model_config(family, size, head)


def build_reference(family: str, size: str, head: str, seed: int = 0) -> nn.Module:
    """mmseg `EncoderDecoder` for ADE20K (150 classes), seeded random weights, eval mode.

    The parameters' init is skipped (~1 s for an L model), then every parameter is filled by ``builders.fill_``
    (``references.randomize_`` values, BN statistics included)."""
    require_mmseg()
    from mmseg.registry import MODELS
    with no_parameter_init():
        model = MODELS.build(model_config(family, size, head))
    return fill_(model, seed, buffers=False)


def mmseg_checkpoint_object(model: nn.Module) -> dict:
    """What an mmseg 1.x checkpoint file holds: `{'meta': {..., 'dataset_meta'}, 'state_dict'}`."""
    from mmseg.datasets import ADE20KDataset
    meta = {'mmseg_version': '1.2.2',
            'dataset_meta': {k: list(v) for k, v in ADE20KDataset.METAINFO.items()}}
    return {'meta': meta, 'state_dict': model.state_dict()}


def save_mmseg_checkpoint(model: nn.Module, path: Path | str) -> Path:
    """Write the model as an mmseg checkpoint file."""
    torch.save(mmseg_checkpoint_object(model), str(path))
    return Path(path)


@torch.no_grad()
def reference_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmseg whole-image inference on a normalised batch: logits at the input size."""
    h, w = x.shape[-2:]
    metas = [dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w))] * x.shape[0]
    return model.encode_decode(x, metas)


@torch.no_grad()
def reference_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The four backbone maps mmseg feeds its neck / heads."""
    return list(model.backbone(x))

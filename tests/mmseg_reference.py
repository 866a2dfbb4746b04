"""mmsegmentation 1.x reference models on CPU, for parity tests only.

mmseg 1.2.2 with mmcv-lite (no compiled ops) imports `mmcv.ops` at module level in a few files
that have nothing to do with Twins, so a stand-in `mmcv.ops` is put in `sys.modules` before
`mmseg.models` is imported. Reference models come from mmseg's own Twins configs (shipped in the
wheel under `mmseg/.mim/configs/twins/`), with SyncBN replaced by BN, seeded random weights
(BatchNorm running statistics included) and eval mode.

Tests call `require_mmseg()` first: it skips the test when mmseg is not installed.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

FAMILIES = ('pcpvt', 'svt')
SIZES = ('small', 'base', 'large')
HEADS = ('fpn', 'upernet')

_CONFIG_FILES = {
    'fpn': 'twins_{family}-{s}_fpn_fpnhead_8xb4-80k_ade20k-512x512.py',
    'upernet': 'twins_{family}-{s}_uperhead_8xb{bs}-160k_ade20k-512x512.py',
}


def _install_mmcv_ops_stand_in() -> None:
    """Put a stand-in `mmcv.ops` in sys.modules (mmcv-lite has no compiled ops)."""
    if 'mmcv.ops' in sys.modules:
        return

    def _unavailable(name: str):
        def fail(*args: Any, **kwargs: Any):
            raise NotImplementedError(f'mmcv.ops.{name} is a test stand-in (mmcv-lite has no ops)')
        return fail

    ops = types.ModuleType('mmcv.ops')
    for name in ('point_sample', 'sigmoid_focal_loss', 'CrissCrossAttention', 'PSAMask',
                 'DeformConv2d', 'ModulatedDeformConv2d'):
        setattr(ops, name, _unavailable(name))
    sys.modules['mmcv.ops'] = ops
    import mmcv
    mmcv.ops = ops


def require_mmseg():
    """Import mmseg's models with the stand-in in place; skip the calling test without mmseg."""
    pytest.importorskip('mmengine')
    pytest.importorskip('mmcv')
    pytest.importorskip('mmseg')
    _install_mmcv_ops_stand_in()
    import mmseg.models  # noqa: F401  registers the models
    from mmseg.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    return mmseg.models


def config_path(family: str, size: str, head: str) -> Path:
    """mmseg's own config file of one of the 12 ADE20K Twins models."""
    import mmseg
    batch = '4' if (family, size) == ('pcpvt', 'small') else '2'
    name = _CONFIG_FILES[head].format(family=family, s=size[0], bs=batch)
    return Path(mmseg.__file__).parent / '.mim' / 'configs' / 'twins' / name


def _syncbn_to_bn(cfg: Any) -> Any:
    if isinstance(cfg, dict):
        out = {k: _syncbn_to_bn(v) for k, v in cfg.items()}
        if out.get('type') == 'SyncBN':
            out['type'] = 'BN'
        return out
    if isinstance(cfg, (list, tuple)):
        return type(cfg)(_syncbn_to_bn(v) for v in cfg)
    return cfg


def model_config(family: str, size: str, head: str) -> dict:
    """The `model` dict of mmseg's config, ready to build on CPU without downloads."""
    require_mmseg()
    from mmengine.config import Config
    cfg = Config.fromfile(str(config_path(family, size, head))).model.to_dict()
    cfg = _syncbn_to_bn(cfg)
    cfg['backbone'].pop('init_cfg', None)   # would download ImageNet weights
    cfg['backbone']['pretrained'] = None
    return cfg


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded random weights that make every parameter and buffer matter.

    Default init leaves norms at 1/0 and BN statistics at 0/1, which would hide wrong eps,
    missing norms or swapped statistics; those get random values here.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor) -> torch.Tensor:
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            module.weight.copy_(randn(module.weight) / fan_in ** 0.5)
            if module.bias is not None:
                module.bias.copy_(0.1 * randn(module.bias))
        elif isinstance(module, nn.MultiheadAttention):
            fan_in = module.embed_dim
            module.in_proj_weight.copy_(randn(module.in_proj_weight) / fan_in ** 0.5)
            module.in_proj_bias.copy_(0.1 * randn(module.in_proj_bias))
        elif isinstance(module, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)):
            module.weight.copy_(1 + 0.2 * randn(module.weight))
            module.bias.copy_(0.1 * randn(module.bias))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(0.2 * randn(module.running_mean))
                module.running_var.copy_(
                    0.5 + torch.rand(module.running_var.shape, generator=gen))
                module.num_batches_tracked.fill_(1000)
    return model


def build_reference(family: str, size: str, head: str, seed: int = 0) -> nn.Module:
    """mmseg `EncoderDecoder` for ADE20K (150 classes), seeded random weights, eval mode."""
    require_mmseg()
    from mmseg.registry import MODELS
    torch.manual_seed(seed)
    model = MODELS.build(model_config(family, size, head))
    return randomize_(model, seed).eval()


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

"""mmsegmentation's own Twins segmenters, built for comparison (the bench and the parity tests).

mmseg is a reference only: never imported at run time by anything else, never needed to install.
mmseg 1.2.2 with mmcv-lite (no compiled ops) imports `mmcv.ops` at module level in a few files that
have nothing to do with Twins, so a stand-in `mmcv.ops` goes into `sys.modules` first (the real one
when full mmcv is installed). Models come from mmseg's own ADE20K Twins configs (shipped in the wheel
under `mmseg/.mim/configs/twins/`), SyncBN replaced by BN, no downloads.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

from torch import nn

FAMILIES = ('pcpvt', 'svt')
SIZES = ('small', 'base', 'large')

_CONFIG_FILES = {
    'fpn': 'twins_{family}-{s}_fpn_fpnhead_8xb4-80k_ade20k-512x512.py',
    'upernet': 'twins_{family}-{s}_uperhead_8xb{bs}-160k_ade20k-512x512.py',
}
_STAND_IN_OPS = ('point_sample', 'sigmoid_focal_loss', 'CrissCrossAttention', 'PSAMask', 'DeformConv2d',
                 'ModulatedDeformConv2d')


def install_mmcv_ops_stand_in() -> None:
    """Full mmcv's `mmcv.ops`, or a stand-in whose members raise (mmcv-lite has no compiled ops)."""
    if 'mmcv.ops' in sys.modules:
        return
    try:
        import mmcv.ops  # noqa: F401  full mmcv
        return
    except Exception:
        pass

    def unavailable(name: str):
        def fail(*args: Any, **kwargs: Any):
            raise NotImplementedError(f'mmcv.ops.{name} is a stand-in (mmcv-lite has no compiled ops)')
        return fail

    ops = types.ModuleType('mmcv.ops')
    for name in _STAND_IN_OPS:
        setattr(ops, name, unavailable(name))
    sys.modules['mmcv.ops'] = ops
    import mmcv
    mmcv.ops = ops


def import_mmseg():
    """mmseg's models, registered, with the stand-in in place; returns `mmseg.models`."""
    install_mmcv_ops_stand_in()
    # mmengine imports transformers, where installed, to register its optimizers (~1 s); a reference model
    # needs none, so transformers is hidden during the import unless something has loaded it already
    hide = 'transformers' not in sys.modules
    if hide:
        sys.modules['transformers'] = None  # type: ignore[assignment]  (import of it raises ImportError)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # mmcv-lite / deprecation chatter, nothing about Twins
            import mmseg.models
            from mmseg.utils import register_all_modules
            register_all_modules(init_default_scope=True)
    finally:
        if hide and sys.modules.get('transformers', 0) is None:
            del sys.modules['transformers']
    return mmseg.models


def unavailable_reason() -> Optional[str]:
    """None when mmsegmentation (with mmcv and mmengine) can build its Twins models here."""
    for mod in ('mmengine', 'mmcv', 'mmseg'):
        if importlib.util.find_spec(mod) is None:
            return '%s is not installed (pip install twins-timm[reference])' % mod
    try:
        import_mmseg()
    except Exception as e:
        text = str(e).strip().splitlines()
        return 'mmseg does not import: %s: %s' % (type(e).__name__, text[0][:300] if text else '')
    return None


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


def model_config(family: str, size: str, head: str) -> Dict[str, Any]:
    """The `model` dict of mmseg's config, ready to build on CPU without downloads."""
    import_mmseg()
    from mmengine.config import Config
    path = config_path(family, size, head)
    if not path.exists():
        raise OSError('mmseg config %s not found in the installed mmsegmentation' % path)
    cfg = _syncbn_to_bn(Config.fromfile(str(path)).model.to_dict())
    cfg['backbone'].pop('init_cfg', None)   # would download ImageNet weights
    cfg['backbone']['pretrained'] = None
    return cfg


def build_segmenter(variant: str, head: str) -> nn.Module:
    """mmseg's `EncoderDecoder` for an ADE20K Twins model, e.g. ('twins_svt_small', 'upernet'); mmseg's init."""
    _, family, size = variant.split('_')
    from mmseg.registry import MODELS
    cfg = model_config(family, size, head)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return MODELS.build(cfg)

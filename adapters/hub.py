"""Load a saved TwinsUPerNet / TwinsFPN without knowing which one it is.

SMP's own `smp.from_pretrained` looks the class up in `segmentation_models_pytorch`, which does not
hold ours; this reads `_model_class` from config.json and dispatches to our classes.
Works on a local folder, a Hub repo id, or a repo in the local HF cache (offline: `twins_timm.files.hub`).
Published names, URLs, checkpoint files and `HEAD:VARIANT` specs: `twins_timm.from_pretrained`, the resolver
one layer up, which comes here for the folder it finds.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Type, Union

from huggingface_hub import hf_hub_download

from twins_timm.adapters.base import TwinsSegmentationModel
from twins_timm.adapters.config import ConfigError
from twins_timm.adapters.decoders.fpn.model import TwinsFPN
from twins_timm.adapters.decoders.upernet.model import TwinsUPerNet
from twins_timm.files import hub

MODEL_CLASSES: Dict[str, Type[TwinsSegmentationModel]] = {
    cls.__name__: cls for cls in (TwinsUPerNet, TwinsFPN)}
# The heads a segmenter spec names (`upernet:twins_svt_small`): the one list.
HEAD_CLASSES: Dict[str, Type[TwinsSegmentationModel]] = {'upernet': TwinsUPerNet, 'fpn': TwinsFPN}
HEADS = tuple(HEAD_CLASSES)
CONFIG_NAME = 'config.json'


def _resolve(name_or_path: str) -> str:
    """A local folder or a Hub repo id as it is; a clear error for anything else."""
    if os.path.isdir(name_or_path) or hub.is_hub_id(name_or_path):
        return name_or_path
    what = 'is a file' if os.path.exists(name_or_path) else 'is not a folder or a Hub repo id (owner/name)'
    raise FileNotFoundError(f'{name_or_path} {what}: twins_timm.adapters.from_pretrained loads folders written by '
                            'save_pretrained() / `twins-timm convert` and Hub repos. For a published model name, an '
                            f'http(s) URL or a checkpoint file use twins_timm.from_pretrained({name_or_path!r})')


def _config_file(name_or_path: str, kwargs: Dict[str, Any]) -> str:
    if os.path.isdir(name_or_path):
        path = Path(name_or_path) / CONFIG_NAME
        if path.exists() and not path.is_file():  # a device or FIFO: reading it would never end or wait forever
            raise ConfigError(f'{path} is not a regular file; a model folder holds the config.json written by '
                              'save_pretrained()')
        if not path.is_file():
            raise FileNotFoundError(
                f'{name_or_path} has no {CONFIG_NAME}; point to a folder written by '
                'save_pretrained() (or to a Hub repo id)')
        return str(path)
    hub_args = {k: kwargs[k] for k in ('revision', 'cache_dir', 'token', 'local_files_only',
                                        'force_download') if k in kwargs}
    return hf_hub_download(name_or_path, filename=CONFIG_NAME, **hub_args)


def read_config(name_or_path: Union[str, Path], **hub_kwargs: Any) -> Dict[str, Any]:
    """config.json of a saved segmenter (folder or Hub repo id), as read: a JSON object, else a ConfigError.
    (Its keys and values are checked when a model is built from it: ``twins_timm.adapters.config``.)"""
    path = _config_file(_resolve(str(name_or_path)), hub_kwargs)
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f'{path} is not a JSON file ({e}); it should be the config.json written by '
                          'save_pretrained() / `twins-timm convert`') from None
    if not isinstance(config, dict):
        raise ConfigError(f'{path} holds a JSON {type(config).__name__}, not the object save_pretrained() writes')
    return config


def from_pretrained(name_or_path: Union[str, Path], *, strict: bool = True,
                    **kwargs: Any) -> TwinsSegmentationModel:
    """Build the saved model class from config.json and load its weights.

    Extra keyword arguments are the hub mixin's (revision, cache_dir, token, local_files_only,
    force_download) or constructor overrides, as for `TwinsUPerNet.from_pretrained`.
    """
    name_or_path = _resolve(str(name_or_path))
    if not os.path.isdir(name_or_path) and hub.offline():
        kwargs.setdefault('local_files_only', True)  # a Hub repo id offline: the local HF cache, no request
    config = read_config(name_or_path, **kwargs)
    class_name = config.get('_model_class')
    if class_name not in MODEL_CLASSES:
        raise ValueError(f'{name_or_path} holds {_what(config)}, not a twins_timm segmenter '
                         f'({", ".join(MODEL_CLASSES)}). {_instead(name_or_path, config)}')
    return MODEL_CLASSES[class_name].from_pretrained(name_or_path, strict=strict, **kwargs)


def _what(config: Dict[str, Any]) -> str:
    arch = config.get('architecture')
    if arch and str(arch).startswith('twins_'):
        head = config.get('num_classes', (config.get('pretrained_cfg') or {}).get('num_classes'))
        return (f'a timm {arch} backbone without a classifier' if head == 0
                else f'a timm {arch} ImageNet classifier ({head} classes)')
    if config.get('_model_class'):
        return f'a {config["_model_class"]}'
    return f'a {arch} model' if arch else 'a model without _model_class'


def _instead(name_or_path: str, config: Dict[str, Any]) -> str:
    if str(config.get('architecture', '')).startswith('twins_'):
        return (f"Load it with timm: timm.create_model('local-dir:{name_or_path}', pretrained=True) after "
                "`import twins_timm`. To segment, use a segmenter: a published one by name (`twins-timm models`, "
                "e.g. upernet_twins_svt_large.ade20k) or a converted mmseg / official segmentation checkpoint")
    return 'Load it with the library that saved it'


"""Load a saved TwinsUPerNet / TwinsFPN without knowing which one it is.

SMP's own `smp.from_pretrained` looks the class up in `segmentation_models_pytorch`, which does not
hold ours; this reads `_model_class` from config.json and dispatches to our classes.
Works on a local folder, a Hub repo id, or a repo in the local HF cache (`HF_HUB_OFFLINE=1`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Type, Union

from huggingface_hub import hf_hub_download

from .base import TwinsSegmentationModel
from .decoders.fpn.model import TwinsFPN
from .decoders.upernet.model import TwinsUPerNet

MODEL_CLASSES: Dict[str, Type[TwinsSegmentationModel]] = {
    cls.__name__: cls for cls in (TwinsUPerNet, TwinsFPN)}
CONFIG_NAME = 'config.json'


def _config_file(name_or_path: str, kwargs: Dict[str, Any]) -> str:
    if os.path.isdir(name_or_path):
        path = Path(name_or_path) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f'{name_or_path} has no {CONFIG_NAME}; point to a folder written by '
                'save_pretrained() (or to a Hub repo id)')
        return str(path)
    hub_args = {k: kwargs[k] for k in ('revision', 'cache_dir', 'token', 'local_files_only',
                                        'force_download') if k in kwargs}
    return hf_hub_download(name_or_path, filename=CONFIG_NAME, **hub_args)


def read_config(name_or_path: Union[str, Path], **hub_kwargs: Any) -> Dict[str, Any]:
    """config.json of a saved segmenter (folder or Hub repo id)."""
    with open(_config_file(str(name_or_path), hub_kwargs), encoding='utf-8') as f:
        return json.load(f)


def from_pretrained(name_or_path: Union[str, Path], *, strict: bool = True,
                    **kwargs: Any) -> TwinsSegmentationModel:
    """Build the saved model class from config.json and load its weights.

    Extra keyword arguments are the hub mixin's (revision, cache_dir, token, local_files_only,
    force_download) or constructor overrides, as for `TwinsUPerNet.from_pretrained`.
    """
    config = read_config(name_or_path, **kwargs)
    class_name = config.get('_model_class')
    if class_name not in MODEL_CLASSES:
        raise ValueError(
            f'{name_or_path} holds a {class_name or "model without _model_class"}, not a twins_timm '
            f'segmenter ({", ".join(MODEL_CLASSES)}); load it with the library that saved it')
    return MODEL_CLASSES[class_name].from_pretrained(str(name_or_path), strict=strict, **kwargs)

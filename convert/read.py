"""Reading job: a checkpoint path, Hub folder or in-memory mapping -> the loaded object and its folder config."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from twins_timm.adapters.config import check_encoder_args
from twins_timm.files.checkpoint import load_file
from twins_timm.files.paths import PathLike


def read_folder_config(path: Path) -> Tuple[Path, Dict[str, Any]]:
    cfg_file = path / 'config.json'
    weights = path / 'model.safetensors'
    if not weights.exists() and (path / 'pytorch_model.bin').exists():  # older Hub folders
        weights = path / 'pytorch_model.bin'
    if not weights.exists():
        raise FileNotFoundError('%s is a folder without model.safetensors (or pytorch_model.bin); pass a checkpoint '
                                'file or a Hub folder written by twins-timm / timm / SMP' % path)
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    return weights, cfg


def config_model_args(cfg: Mapping[str, Any], where: str = 'config.json') -> Optional[Dict[str, Any]]:
    """Backbone kwargs recorded in a timm or SMP config.json, without the generic ones that the conversion sets
    itself; the rest must be backbone settings twins_timm defines (a ConfigError otherwise)."""
    if 'encoder_args' in cfg:
        return check_encoder_args(cfg.get('encoder_args') or {}, '%s encoder_args' % where)
    if 'model_args' in cfg:
        skip = ('num_classes', 'in_chans', 'global_pool', 'img_size')
        model_args = cfg['model_args'] or {}
        if isinstance(model_args, Mapping):
            model_args = {k: v for k, v in model_args.items() if k not in skip}
        return check_encoder_args(model_args, '%s model_args' % where)
    return None



def read_source(src: Union[PathLike, Mapping[str, Any]], progress: Optional[bool]
                 ) -> Tuple[Any, Optional[str], bool, Optional[Dict[str, Any]]]:
    """(loaded object, source name, is_safetensors, folder config) for a path, folder or mapping."""
    if isinstance(src, Mapping):
        return src, None, False, None
    path = Path(src)
    cfg = None
    if path.is_dir():
        path, cfg = read_folder_config(path)
    elif path.suffix == '.safetensors' and (path.parent / 'config.json').exists():
        cfg = json.loads((path.parent / 'config.json').read_text())
    return load_file(path, progress=progress), str(path), path.suffix == '.safetensors', cfg


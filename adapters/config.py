"""What a segmenter's config.json may hold: every key twins_timm defines, with its type and range.

A folder or Hub repo need not be the user's own, and its config.json chooses the constructor arguments,
``encoder_args`` among them, which go on to ``timm.create_model``. So nothing from it passes unless it is
defined here: an unknown key (``checkpoint_path``, ``pretrained_cfg_overlay``, ``pretrained``, ...) or a
value of the wrong type or size is a ``ConfigError`` naming the key and what is allowed, raised before
anything is built. ``save_pretrained`` checks what it writes by the same rules, so every folder written
loads; the converter checks the backbone settings of the timm folders it reads and writes.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, Tuple

import timm

from twins_timm.models.twins import PATCH_PADDINGS

# Largest number of classes a segmenter may have: ADE20K-full has 3688, COCO-Stuff 182; the default
# class names and palette are built per class, so a bound keeps a config from asking for gigabytes.
MAX_CLASSES = 65535
ACTIVATIONS = (None, 'identity', 'sigmoid', 'softmax', 'softmax2d', 'logsoftmax', 'tanh', 'argmax', 'argmax2d',
               'clamp')

Check = Tuple[str, Callable[[Any], bool]]  # (what is allowed, in words; the test)


class ConfigError(ValueError):
    """config.json (or encoder_args) holds a key twins_timm does not define, or a value it does not allow."""


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(lo: int, hi: int) -> Check:
    return 'an integer from %d to %d' % (lo, hi), lambda v: _is_int(v, lo, hi)


def _rate() -> Check:
    return 'a number from 0 to below 1', lambda v: _is_number(v) and 0 <= v < 1


def _flag() -> Check:
    return 'true or false', lambda v: isinstance(v, bool)


def _list_of(n: Tuple[int, int], what: str, item: Callable[[Any], bool]) -> Check:
    count = '%d' % n[0] if n[0] == n[1] else '%d to %d' % n
    return '%s %s' % (count, what), lambda v: (isinstance(v, (list, tuple)) and n[0] <= len(v) <= n[1]
                                               and all(map(item, v)))


def _optional(check: Check) -> Check:
    return 'null or ' + check[0], lambda v: v is None or check[1](v)


def _twins_variant(v: Any) -> bool:
    return isinstance(v, str) and v.startswith('twins_') and timm.is_model(v)


# Backbone settings (twins_timm.models.twins.Twins arguments) that encoder_args / a timm folder's model_args
# may pass to timm.create_model.
ENCODER_ARGS: Dict[str, Check] = {
    'stage_norm': _flag(),
    'window_mask': _flag(),
    'norm_eps': ('a number above 0 and at most 0.1', lambda v: _is_number(v) and 0 < v <= 0.1),
    'patch_padding': (' or '.join(map(repr, PATCH_PADDINGS)), lambda v: v in PATCH_PADDINGS),
    'drop_path_rate': _rate(),
    'drop_rate': _rate(),
    'pos_drop_rate': _rate(),
    'proj_drop_rate': _rate(),
    'attn_drop_rate': _rate(),
    'depths': _list_of((4, 4), 'integers from 1 to 64 (blocks per stage)', lambda v: _is_int(v, 1, 64)),
    'mlp_ratios': _list_of((4, 4), 'numbers above 0 and at most 64', lambda v: _is_number(v) and 0 < v <= 64),
}

_CHANNELS = _integer(1, 4096)
_RGB = _list_of((3, 3), 'integers from 0 to 255', lambda v: _is_int(v, 0, 255))

# Every key of a TwinsUPerNet / TwinsFPN config.json (both classes' constructor arguments, and what the
# hub mixin and timm's local-dir: loader read). Lengths that depend on `classes` are the constructor's check.
SEGMENTER_CONFIG: Dict[str, Check] = {
    '_model_class': ('the class name (TwinsUPerNet or TwinsFPN)', lambda v: isinstance(v, str)),
    'encoder_name': ('a Twins variant (twins_pcpvt_small ... twins_svt_large)', _twins_variant),
    'classes': _integer(1, MAX_CLASSES),
    'encoder_args': ('an object of backbone settings (%s)' % ', '.join(ENCODER_ARGS),
                     lambda v: isinstance(v, dict)),
    'encoder_weights': ('null: the saved weights hold the encoder', lambda v: v is None or v is False),
    'aux_head': _flag(),
    'in_channels': _integer(1, 1024),
    'decoder_channels': _CHANNELS,
    'pool_scales': _list_of((1, 8), 'integers from 1 to 64', lambda v: _is_int(v, 1, 64)),
    'decoder_pyramid_channels': _CHANNELS,
    'decoder_segmentation_channels': _CHANNELS,
    'decoder_dropout': _rate(),
    'aux_channels': _CHANNELS,
    'class_names': _optional(_list_of((1, MAX_CLASSES), 'strings, one per class', lambda v: isinstance(v, str))),
    'palette': _optional(_list_of((1, MAX_CLASSES), 'RGB triples of integers 0-255, one per class', _RGB[1])),
    'mean': _list_of((3, 3), 'numbers (0-255 RGB)', _is_number),
    'std': _list_of((3, 3), 'numbers above 0 (0-255 RGB)', lambda v: _is_number(v) and v > 0),
    'activation': ('null or one of %s' % ', '.join(map(str, ACTIVATIONS[1:])), lambda v: v in ACTIVATIONS),
    'architecture': ('a Twins variant (the encoder_name, for timm\'s local-dir: loader)', _twins_variant),
    'pretrained_cfg': ('{} (for timm\'s local-dir: loader)', lambda v: v == {}),
    # the test scale a trained model was trained for: checked where it is read (base._checked_test_scale)
    'test_scale': ('two positive integers (long side, short side)', lambda v: True),
}


def _check(values: Mapping[str, Any], schema: Mapping[str, Check], what: str) -> None:
    if not isinstance(values, Mapping):
        raise ConfigError('%s must be a JSON object, got %s' % (what, _short(values)))
    for key, value in values.items():
        if key not in schema:
            raise ConfigError('%s has the key %r, which twins_timm does not define, so it is refused (a model '
                              'folder\'s config.json carries these: only defined keys may reach timm or a loader); '
                              'the keys are: %s'
                              % (what, key, ', '.join(schema)))
        allowed, test = schema[key]
        if not test(value):
            raise ConfigError('%s: %r must be %s, got %s' % (what, key, allowed, _short(value)))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + '...'


def check_encoder_args(args: Mapping[str, Any], what: str = 'encoder_args') -> Dict[str, Any]:
    """``args`` as a dict if each key is a backbone setting in ``ENCODER_ARGS`` with an allowed value."""
    _check(args, ENCODER_ARGS, what)
    return dict(args)


def check_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse a segmenter config.json (of the folder or repo ``where``) holding what ``SEGMENTER_CONFIG`` does
    not allow."""
    _check(config, SEGMENTER_CONFIG, '%s: config.json' % where)
    check_encoder_args(config.get('encoder_args') or {}, '%s: config.json encoder_args' % where)

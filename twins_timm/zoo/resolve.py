"""The one resolver of a model spec, used by every command, by training and by ``twins_timm.from_pretrained``.

A spec is one of (tried in this order):

* ``HEAD:VARIANT`` (``upernet:twins_svt_small``): fresh mmseg heads on timm's ImageNet backbone;
* a folder written by ``save_pretrained`` / ``twins-timm convert`` (a segmenter, or a timm backbone /
  classifier read with timm's ``local-dir:``);
* a checkpoint file (mmseg, official, timm), converted in memory;
* a published name (``twins-timm models``) or an http(s) URL: fetched, verified, converted, cached once;
* a Hugging Face Hub id (``owner/name``): the local Hugging Face cache first, then one download.

``load_model`` is the commands' door: segmenters only, and for the default model a clearly labelled
random-initialised stand-in when it cannot be had.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

from torch import nn

from twins_timm.adapters import ade20k
from twins_timm.adapters.hub import HEAD_CLASSES, HEADS, from_pretrained as segmenter_from_folder, read_config
from twins_timm.files import hub
from twins_timm.files.hub import FetchError
from twins_timm.models.twins import VARIANTS, checkpoint_family_args
from twins_timm.zoo import published

# Without --model: the best published ADE20K model by name (UPerNet SVT-L, 49.65 mIoU).
DEFAULT_MODEL_ID = published.DEFAULT_SEGMENTER
# Backbone of the random-initialised stand-in used when DEFAULT_MODEL_ID is not available.
RANDOM_FALLBACK_ENCODER = 'twins_svt_small'
RANDOM_LABEL = 'RANDOM WEIGHTS - not a trained model'
ARCH_EXAMPLE = 'upernet:twins_svt_small'
# what a Hub repo of a saved model holds that loading needs
HUB_FILES = ('config.json', '*.safetensors', '*.md')
SEGMENTER_TASKS = tuple(HEADS)


@dataclass
class LoadedModel:
    model: nn.Module
    source: str
    random_weights: bool = False


# ------------------------------------------------------------------------------------ spec kinds
def parse_arch(spec: str) -> Optional[Tuple[str, str]]:
    """('upernet', 'twins_svt_small') for 'upernet:twins_svt_small'; None for other specs."""
    head, sep, variant = spec.partition(':')
    if not sep or head.lower() not in HEADS:
        return None
    if variant not in VARIANTS:
        raise ValueError('%s: unknown Twins variant %r; use one of %s' % (spec, variant, ', '.join(VARIANTS)))
    return head.lower(), variant


def model_files(spec: Optional[str], default: Optional[str] = None) -> List[Path]:
    """The local files a --model reads: the file, every file in the folder, or a zoo entry's cached files
    (``spec`` None: the ``default`` name). A Hub id or a ``HEAD:VARIANT`` reads nothing a command could write."""
    spec = spec or default
    if not spec:
        return []
    path = Path(spec)
    if not path.exists():
        if not (published.is_url(spec) or spec in published.MODELS):
            return []
        path = published.folder_for(spec)
        kept = [published.raw_path(spec if published.is_url(spec) else published.MODELS[spec].url)]
        return [p for p in kept if p.is_file()] + (model_files(str(path)) if path.is_dir() else [])
    if path.is_dir():
        return sorted(p for p in path.rglob('*') if p.is_file())
    return [path]


# --------------------------------------------------------------------------------- model makers
def new_segmenter(head: str, variant: str, classes: int = 150, encoder_weights: Optional[bool] = True,
                  encoder_args: Optional[dict] = None, **kwargs: Any) -> nn.Module:
    """Fresh mmseg heads on a Twins backbone with mmseg's backbone settings (``encoder_args`` on top) and
    timm's ImageNet weights (``encoder_weights=None``: random)."""
    encoder_args = dict(checkpoint_family_args('mmseg', variant), **(encoder_args or {}))
    return HEAD_CLASSES[head](encoder_name=variant, classes=classes, encoder_weights=encoder_weights,
                              encoder_args=encoder_args, **kwargs)


def random_model(num_classes: int = 150) -> nn.Module:
    """A Twins-SVT-S UPerNet with ADE20K classes and seeded random weights (demo stand-in)."""
    import torch
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = HEAD_CLASSES['upernet'](encoder_name=RANDOM_FALLBACK_ENCODER, classes=num_classes,
                                        class_names=list(ade20k.CLASSES),
                                        palette=[list(c) for c in ade20k.PALETTE], aux_head=False)
    finally:
        torch.random.set_rng_state(state)
    return model


def _from_folder(folder: str, segmenter: bool, kwargs: dict) -> nn.Module:
    """A saved segmenter by its ``_model_class``; a timm Twins folder with timm (unless a segmenter is wanted:
    then the adapters' loader says what the folder holds)."""
    config = read_config(folder)
    if segmenter or '_model_class' in config or not str(config.get('architecture', '')).startswith('twins_'):
        return segmenter_from_folder(folder, **kwargs)
    import timm
    return timm.create_model('local-dir:%s' % folder, pretrained=True, **kwargs)


def _from_checkpoint(path: str, segmenter: bool, kwargs: dict) -> nn.Module:
    from twins_timm.adapters.base import check_finite
    from twins_timm.convert import build_model, convert_checkpoint
    if kwargs:
        raise ValueError('%s is a checkpoint file: it loads as it is (no %s). Convert it into a folder first '
                         '(twins-timm convert %s OUT_DIR) and pass the folder' % (path, ', '.join(kwargs), path))
    res = convert_checkpoint(path)
    if segmenter and res.task not in SEGMENTER_TASKS:
        raise ValueError('%s holds a Twins %s %s (%s), not a segmentation model (UPerNet or FPN). Segment with a '
                         'segmenter instead: a published one by name (`twins-timm models`, e.g. --model %s) or a '
                         'converted segmentation checkpoint' % (path, res.variant, res.task, res.format,
                                                                DEFAULT_MODEL_ID))
    check_finite(res.state_dict, path)
    return build_model(res)


def _check_published_segmenter(spec: str) -> None:
    record = published.get(spec)
    if not record.is_segmenter:
        raise ValueError('%s is a published %s (%s, %s), not a segmentation model. Pass a segmenter, e.g. '
                         '--model %s (`twins-timm models` lists them); use %s in Python with '
                         'twins_timm.from_pretrained(%r)' % (spec, 'ImageNet classifier' if record.task ==
                                                             'classification' else 'ImageNet backbone without a head',
                                                             record.variant, record.dataset, DEFAULT_MODEL_ID, spec,
                                                             spec))


def _unknown(spec: str) -> FileNotFoundError:
    close = difflib.get_close_matches(spec, list(published.MODELS), n=2, cutoff=0.6)
    return FileNotFoundError('model %s does not exist: not a folder, a checkpoint file, a published model name%s '
                             '(`twins-timm models`), an http(s) URL, a Hub id (owner/name) or HEAD:VARIANT (e.g. %s)'
                             % (spec, ' (did you mean %s?)' % ' or '.join(close) if close else '', ARCH_EXAMPLE))


def resolve(spec: Union[str, os.PathLike], segmenter: bool = False, **kwargs: Any) -> LoadedModel:
    """The model of any spec (see the module's docstring) and where it came from. ``segmenter``: refuse
    anything but a trained segmenter, each with what to use instead. ``kwargs`` go to the model's
    constructor (``HEAD:VARIANT``) or loader (folders, names, URLs, Hub ids)."""
    spec = str(spec)
    arch = parse_arch(spec)
    if arch is not None:
        if segmenter:
            raise ValueError('%s is an untrained segmenter (fresh %s heads on an ImageNet backbone); train it '
                             'first: twins-timm train --model %s --data DIR --out OUT_DIR, then pass OUT_DIR'
                             % (spec, arch[0], spec))
        weights = 'timm ImageNet' if kwargs.get('encoder_weights', True) else 'random-initialised'
        source = '%s on a %s %s backbone' % (arch[0], weights, arch[1])
        return LoadedModel(new_segmenter(*arch, **kwargs), source)
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return LoadedModel(_from_folder(expanded, segmenter, kwargs), 'folder %s' % expanded)
    if os.path.isfile(expanded):
        return LoadedModel(_from_checkpoint(expanded, segmenter, kwargs), 'checkpoint %s' % expanded)
    if published.is_url(spec) or spec in published.MODELS:
        if segmenter and not published.is_url(spec):
            _check_published_segmenter(spec)
        was_cached = published.cached_path(spec) is not None
        folder = published.fetch(spec)
        return LoadedModel(_from_folder(str(folder), segmenter, kwargs),
                           '%s (%s%s)' % (spec, folder, '' if was_cached else ', downloaded and converted now'))
    if hub.is_hub_id(spec):
        where = 'Hub cache' if hub.cached_snapshot(spec) is not None else 'Hub'
        folder = hub.snapshot(spec, HUB_FILES)
        return LoadedModel(_from_folder(str(folder), segmenter, kwargs), '%s %s (%s)' % (where, spec, folder))
    raise _unknown(spec)


def from_pretrained(spec: Union[str, os.PathLike], **kwargs: Any) -> nn.Module:
    """The model of any spec: a published name, an http(s) URL, a folder, a checkpoint file, a Hub id
    (``owner/name``) or ``HEAD:VARIANT`` (fresh heads on timm's ImageNet backbone, e.g. 'upernet:twins_svt_small').

    Segmenters come as TwinsUPerNet / TwinsFPN, timm backbones and classifiers as timm models. Keyword
    arguments override constructor arguments (``classes=...``, ``encoder_args=...``) as for
    ``TwinsUPerNet.from_pretrained``. Offline (``TWINS_TIMM_OFFLINE`` / ``HF_HUB_OFFLINE``) only local files
    and caches are read; a miss is a FetchError that says how to get the model.
    """
    return resolve(spec, **kwargs).model


def load_model(spec: Optional[str] = None, allow_random: Optional[bool] = None,
               log: Optional[Callable[[str], None]] = None) -> LoadedModel:
    """A trained segmenter for the commands, in eval mode.

    ``spec=None`` means DEFAULT_MODEL_ID; only then (or with ``allow_random=True``) does a model that
    cannot be fetched fall back to :func:`random_model`, announced on ``log`` (default stderr).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if allow_random is None:
        allow_random = spec is None
    spec = spec or DEFAULT_MODEL_ID
    try:
        loaded = resolve(spec, segmenter=True)
    except FetchError as e:
        if not allow_random:
            raise
        why, force = e.reason, isinstance(e, published.DamagedEntry)
    else:
        loaded.model.eval()
        return loaded
    if why.startswith(spec + ':'):  # fetch errors already begin with the name
        why = why[len(spec) + 1:].lstrip()
    # one short paragraph (printed under --quiet too): the details come with the command that fixes it
    log('No converted weights found for %s: %s. Running with a RANDOM-INITIALISED %s UPerNet instead: the '
        'output shows the pipeline working, not a real segmentation. Get the real model once, with internet: '
        'twins-timm models --download %s%s' % (spec, why, RANDOM_FALLBACK_ENCODER, spec, ' --force' if force else ''))
    return LoadedModel(random_model().eval(), 'random-initialised %s UPerNet (%s)'
                       % (RANDOM_FALLBACK_ENCODER, RANDOM_LABEL), random_weights=True)

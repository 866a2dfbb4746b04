"""The one resolver of a model spec: a folder, a checkpoint file, a published name, an http(s) URL or a Hub id
turned into a segmenter (or, for the default model only, a clearly labelled random-initialised stand-in).
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

# Without --model: the best published ADE20K model by name (twins_timm.zoo; UPerNet SVT-L, 49.65 mIoU).
DEFAULT_MODEL_ID = 'upernet_twins_svt_large.ade20k'
# Backbone of the random-initialised stand-in used when DEFAULT_MODEL_ID is not available.
RANDOM_FALLBACK_ENCODER = 'twins_svt_small'
RANDOM_LABEL = 'RANDOM WEIGHTS - not a trained model'


@dataclass
class LoadedModel:
    model: nn.Module
    source: str
    random_weights: bool = False


_HUB_ID = re.compile(r'^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$')


def _looks_like_path(spec: str) -> bool:
    """Anything that is not ``owner/name`` is taken for a local path."""
    return not _HUB_ID.match(spec) or '..' in spec


def _cached_snapshot(repo_id: str) -> Optional[str]:
    """Folder of ``repo_id`` in the local Hub cache, without touching the network."""
    from huggingface_hub import snapshot_download, try_to_load_from_cache
    try:
        config = try_to_load_from_cache(repo_id, 'config.json')
    except Exception:  # invalid repo id, unreadable cache
        return None
    if isinstance(config, str):
        return os.path.dirname(config)
    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        return None


def _hub_offline() -> bool:
    from twins_timm import zoo
    return zoo.offline()


def _download(repo_id: str) -> Optional[str]:
    if _hub_offline():
        return None
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=['config.json', '*.safetensors', '*.md'])
    except Exception:  # no network, no such repo, no access
        return None


def _from_folder(folder: str) -> nn.Module:
    from twins_timm.adapters import from_pretrained
    return from_pretrained(folder)  # says what a folder holds when it is not a segmenter


def _from_checkpoint(path: str) -> nn.Module:
    from twins_timm.adapters.base import check_finite
    from twins_timm.convert import build_model, convert_checkpoint
    res = convert_checkpoint(path)
    if res.task not in ('upernet', 'fpn'):
        raise ValueError('%s holds a Twins %s %s (%s), not a segmentation model (UPerNet or FPN). Segment with a '
                         'segmenter instead: a published one by name (`twins-timm models`, e.g. --model %s) or a '
                         'converted segmentation checkpoint' % (path, res.variant, res.task, res.format,
                                                                DEFAULT_MODEL_ID))
    check_finite(res.state_dict, path)
    return build_model(res)


def random_model(num_classes: int = 150) -> nn.Module:
    """A Twins-SVT-S UPerNet with ADE20K classes and seeded random weights (demo stand-in)."""
    import torch
    from twins_timm.adapters import TwinsUPerNet, ade20k
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = TwinsUPerNet(encoder_name=RANDOM_FALLBACK_ENCODER, classes=num_classes,
                             class_names=list(ade20k.CLASSES), palette=[list(c) for c in ade20k.PALETTE],
                             aux_head=False)
    finally:
        torch.random.set_rng_state(state)
    return model


def _zoo_segmenter(spec: str) -> LoadedModel:
    """A published model by name or an http(s) URL: cached, or downloaded + verified + converted now."""
    from twins_timm import zoo
    if not zoo.is_url(spec):
        record = zoo.get(spec)
        if not record.is_segmenter:
            raise ValueError('%s is a published %s (%s, %s), not a segmentation model. Pass a segmenter, e.g. '
                             '--model %s (`twins-timm models` lists them); use %s in Python with '
                             'twins_timm.zoo.create_model(%r)' % (spec, 'ImageNet classifier' if record.task ==
                                                                 'classification' else 'ImageNet backbone without '
                                                                 'a head', record.variant, record.dataset,
                                                                 DEFAULT_MODEL_ID, spec, spec))
    was_cached = zoo.cached_path(spec) is not None
    folder = zoo.fetch(spec)
    return LoadedModel(_from_folder(str(folder)).eval(), '%s (%s%s)' % (spec, folder, '' if was_cached else
                                                                       ', downloaded and converted now'))


def load_model(spec: Optional[str] = None, allow_random: Optional[bool] = None, log=None) -> LoadedModel:
    """Find a segmenter: a folder, a checkpoint file, a published name, an http(s) URL, or a Hub id.

    ``spec=None`` means DEFAULT_MODEL_ID; only then (or with ``allow_random=True``) does a model that
    cannot be had fall back to :func:`random_model`, announced on ``log`` (default stderr).
    """
    from twins_timm import zoo

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if allow_random is None:
        allow_random = spec is None
    spec = spec or DEFAULT_MODEL_ID
    expanded = os.path.expanduser(spec)
    if os.path.isdir(expanded):
        return LoadedModel(_from_folder(expanded).eval(), 'folder %s' % expanded)
    if os.path.isfile(expanded):
        return LoadedModel(_from_checkpoint(expanded).eval(), 'checkpoint %s' % expanded)
    if zoo.is_url(spec) or spec in zoo.MODELS:
        try:
            return _zoo_segmenter(spec)
        except zoo.ZooError as e:
            if not allow_random:
                raise
            why, force = e.reason, isinstance(e, zoo.DamagedEntry)
    elif _looks_like_path(spec):
        close = difflib.get_close_matches(spec, list(zoo.MODELS), n=2, cutoff=0.6)
        raise FileNotFoundError('model %s does not exist: not a folder, a checkpoint file, a published model name%s '
                                '(`twins-timm models`), an http(s) URL or a Hub id (owner/name)'
                                % (spec, ' (did you mean %s?)' % ' or '.join(close) if close else ''))
    else:
        folder = _cached_snapshot(spec)
        where = 'Hub cache'
        if folder is None:
            folder, where = _download(spec), 'Hub'
        if folder is not None:
            return LoadedModel(_from_folder(folder).eval(), '%s %s (%s)' % (where, spec, folder))
        why = ('not in the local Hub cache and offline mode is on (%s)' % zoo.OFFLINE_SWITCHES if _hub_offline()
               else 'not in the local Hub cache and could not be downloaded')
        force = False
        if not allow_random:
            raise FileNotFoundError(
                'model %s: %s. Convert a checkpoint with `twins-timm convert` and pass the folder '
                'with --model DIR, or download the Hub repository while online.' % (spec, why))
    if why.startswith(spec + ':'):  # zoo errors already begin with the name
        why = why[len(spec) + 1:].lstrip()
    # one short paragraph (printed under --quiet too): the details come with the command that fixes it
    log('No converted weights found for %s: %s. Running with a RANDOM-INITIALISED %s UPerNet instead: the '
        'output shows the pipeline working, not a real segmentation. Get the real model once, with internet: '
        'twins-timm models --download %s%s' % (spec, why, RANDOM_FALLBACK_ENCODER, spec, ' --force' if force else ''))
    return LoadedModel(random_model().eval(), 'random-initialised %s UPerNet (%s)'
                       % (RANDOM_FALLBACK_ENCODER, RANDOM_LABEL), random_weights=True)

"""The model a training run starts from: any model spec, made by the one resolver (``twins_timm.zoo.resolve``).

``HEAD:VARIANT`` (``upernet:twins_svt_small``) gives fresh mmseg heads on timm's ImageNet backbone (or a random
one with ``from_scratch``) with the recipe's drop-path rate.  Anything else (a folder from ``save_pretrained`` /
``twins-timm convert``, a checkpoint file, a published name, a URL, a Hub id) is loaded as the commands load it
and rebuilt here with the training drop-path rate; when the number of classes changes, its classifiers start
fresh.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torch import nn

from twins_timm.adapters.hub import HEAD_CLASSES
from twins_timm.files.hub import FetchError
from twins_timm.zoo.resolve import load_model, parse_arch, resolve

from .recipe import recipe_for

CLASSIFIERS = ('segmentation_head.conv_seg.', 'aux_head.conv_seg.')


def head_of(model: nn.Module) -> str:
    for head, cls in HEAD_CLASSES.items():
        if isinstance(model, cls):
            return head
    raise ValueError('%s is not a Twins segmenter (TwinsUPerNet / TwinsFPN); twins-timm train trains those'
                     % type(model).__name__)


def adapt(model: nn.Module, classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
          drop_path_rate: Optional[float] = None) -> nn.Module:
    """Rebuild a loaded segmenter for training: its weights, the training drop-path rate, and fresh
    classifiers (mmseg's ``conv_seg``) when ``classes`` differs from the model's."""
    import inspect

    import torch
    accepted = inspect.signature(type(model).__init__).parameters
    # config.json also carries keys for other loaders (timm's 'architecture'): keep the constructor's
    config = {k: v for k, v in dict(model.config).items() if k in accepted}
    classes = classes or model.classes
    new_classes = classes != model.classes
    if class_names is not None:
        config['class_names'] = list(class_names)
    elif new_classes:
        config['class_names'] = None
    if new_classes:
        config['palette'] = None
    config['classes'] = classes
    if drop_path_rate is not None:
        config['encoder_args'] = dict(config.get('encoder_args') or {}, drop_path_rate=drop_path_rate)
    config['encoder_weights'] = None
    rebuilt = type(model)(**config)
    state = model.state_dict()
    if new_classes:
        state = {k: v for k, v in state.items() if not k.startswith(CLASSIFIERS)}
    with torch.no_grad():
        missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    bad = [k for k in missing if not (new_classes and k.startswith(CLASSIFIERS))] + list(unexpected)
    if bad:  # pragma: no cover - the same class and config always match
        raise ValueError('could not carry the weights over (%s)' % ', '.join(bad[:5]))
    return rebuilt


def build_model(spec: str, classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                from_scratch: bool = False, drop_path_rate: Optional[float] = None,
                log=print) -> Tuple[nn.Module, str]:
    """(model ready to train, description of its source) for a command-line SPEC."""
    arch = parse_arch(spec)
    if arch is not None:
        if drop_path_rate is None:
            drop_path_rate = recipe_for(*arch).drop_path_rate
        n = classes or (len(class_names) if class_names else 150)
        try:
            loaded = resolve(spec, classes=n, class_names=class_names, encoder_weights=None if from_scratch else True,
                             encoder_args=dict(drop_path_rate=drop_path_rate))
        except FetchError as e:  # timm's ImageNet weights out of reach: say that training can go without
            raise type(e)(e.reason, e.remedy + ' Or train from random weights: --from-scratch.') from None
        return loaded.model, loaded.source
    if from_scratch:
        raise ValueError('--from-scratch only applies to HEAD:VARIANT specs such as upernet:twins_svt_small; '
                         '%s is a trained model' % spec)
    loaded = load_model(spec, allow_random=False)
    model = loaded.model
    if drop_path_rate is None:
        drop_path_rate = recipe_for(head_of(model), model.encoder_name).drop_path_rate
    if classes and classes != model.classes:
        log('%s has %d classes; training %d: its classifiers start from random weights'
            % (spec, model.classes, classes))
    return adapt(model, classes, class_names, drop_path_rate), loaded.source

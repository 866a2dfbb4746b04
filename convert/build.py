"""Building job: the target model (timm backbone / classifier, SMP segmenter) on the meta device, then the weights.

Weights are adopted with ``load_state_dict(assign=True)``: no random initialisation, no copy, and no
global patching of ``nn.Module`` (timm builds on the meta device itself, ``device='meta'``; SMP
segmenters are built under ``torch.device('meta')``).
"""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch
from torch import nn

import twins_timm.models.twins  # noqa: F401  registers our Twins variants with timm
from twins_timm.adapters import TwinsFPN, TwinsUPerNet

SEGMENTER_TASKS = ('fpn', 'upernet')


def make_model(variant: str, task: str, num_classes: int, model_args: Mapping[str, Any], aux_head: bool = False,
               class_names: Optional[List[str]] = None, palette: Optional[List[List[int]]] = None,
               device: Union[str, torch.device, None] = None) -> nn.Module:
    """A target model of the given kind (random weights; ``device='meta'``: no memory, no init time)."""
    if task in SEGMENTER_TASKS:
        cls = TwinsUPerNet if task == 'upernet' else TwinsFPN
        kw: Dict[str, Any] = dict(encoder_name=variant, classes=num_classes, encoder_args=dict(model_args),
                                  class_names=class_names, palette=palette)
        if task == 'upernet':
            kw['aux_head'] = aux_head
        if device is None:
            return cls(**kw)
        with torch.device(device):
            return cls(**kw)
    return timm.create_model(variant, pretrained=False, num_classes=num_classes, device=device, **dict(model_args))


def make_for(res, device: Union[str, torch.device, None] = None) -> nn.Module:
    """The empty target model of a ConversionResult."""
    return make_model(res.variant, res.task, res.num_classes, res.model_args, res.aux_head,
                      res.meta.get('class_names'), res.meta.get('palette'), device=device)


def target_shapes(variant: str, task: str, num_classes: int, model_args: Mapping[str, Any],
                  aux_head: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the target model, built with meta weights (no memory, fast even for L)."""
    return dict(_target_shapes(variant, task, num_classes, json.dumps(dict(model_args), sort_keys=True), aux_head))


@functools.lru_cache(maxsize=32)
def _target_shapes(variant: str, task: str, num_classes: int, model_args_json: str,
                   aux_head: bool) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    model = make_model(variant, task, num_classes, json.loads(model_args_json), aux_head, device='meta')
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())



def load_into(make: Callable[..., nn.Module], state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """``make(device='meta')``, then adopt ``state_dict``'s tensors (strict; no random init, no copy).

    Falls back to an ordinary build + copy when the model keeps tensors outside its state dict
    (non-persistent buffers) that would otherwise stay on the meta device.
    """
    model = make(device='meta')
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = make(device=None)
        model.load_state_dict(state_dict, strict=True)
    return model


def build_model(res, device: Union[str, torch.device] = 'cpu') -> nn.Module:
    """The target model (timm backbone/classifier or SMP segmenter) with the weights loaded strictly, in eval mode.

    The model's tensors are those of ``res.state_dict`` (not copies); clone the state dict first if
    both must be changed independently.
    """
    model = load_into(lambda device=None: make_for(res, device), res.state_dict)
    return model.to(device).eval()

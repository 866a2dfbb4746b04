"""Explicit CPU-inference speed-ups: ``model = twins_timm.optimize(model)``.

The plain model (``timm.create_model``, ``twins_timm.adapters`` segmenters) is timm's / mmseg's
computation. ``optimize`` swaps the class of a few layers for subclasses with faster CPU-inference
forwards: the backbone's MLP GELU works in place (``layers.py``), UPerHead fuses its pyramid conv per level
(``decoders.py``). The same module objects, parameters, state dict keys and values, hooks and training
behaviour; a layer the user replaced or wrapped (PEFT's LoRA wraps the swapped layer and still adds its
update) keeps its own forward. Each of these measured >= 5 % end to end (docs/cpu-inference.md); nothing is
chosen by timing, so the optimized model computes the same numbers run after run.
"""
from __future__ import annotations

from torch import nn

from twins_timm.models.twins import Block
from twins_timm.optimize import decoders, layers

__all__ = ['optimize']

# the options of earlier versions, whose choices were measured and removed (docs/cpu-inference.md)
REMOVED_OPTIONS = {'kernels': "optimize() no longer takes kernels=: the MLP row chunks, its last choice, were "
                              "measured under 5 % and removed, so there is nothing left to choose; call "
                              "optimize(model)"}


def optimize(model: nn.Module, **removed: object) -> nn.Module:
    """Swap the CPU-inference layers into ``model`` (a Twins backbone, a segmenter, anything holding
    them) in place, and return it. Optimizing again changes nothing. It takes no options: ``removed`` only
    catches those of earlier versions (``kernels=``) to say why they are gone."""
    if removed:  # an earlier version's option is named as removed, anything else as Python would
        name = next(iter(removed))
        raise TypeError(REMOVED_OPTIONS.get(name, f'optimize() got an unexpected keyword argument {name!r}'))
    for module in model.modules():
        if type(module) is Block:
            layers.inplace_mlp_gelu(module)
        fast = decoders.SWAPS.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return model

"""Explicit CPU-inference speed-ups: ``model = twins_timm.optimize(model)``.

The plain model (``timm.create_model``, ``twins_timm.adapters`` segmenters) is timm's / mmseg's
computation. ``optimize`` swaps the class of a few layers for subclasses with faster CPU-inference
forwards: the backbone's blocks run their MLP over cache-sized row chunks with the GELU in place
(``layers.py``), UPerHead fuses its pyramid conv per level (``decoders.py``). The same module objects,
parameters, state dict keys and values, hooks and training behaviour; a layer the user replaced or wrapped
(PEFT's LoRA wraps the swapped layer and still adds its update) keeps its own forward. Each of these
measured >= 5 % end to end (docs/cpu-inference.md). Whether the MLP takes its row chunks is the model's
:class:`~twins_timm.optimize.kernels.KernelTable` choice (``kernels``):

  * ``'auto'``: each new shape is timed once, both candidates on the block's own modules (a first
    forward costs the calibration); results within ~1e-6 of timm's scale, varying with the machine,
  * ``'plain'``: timm's whole-tensor MLP for every shape, nothing timed,
  * ``'rows'``: the row chunks wherever a shape splits, nothing timed,
  * a saved table: ``kernel_choices(model)`` of an earlier run (a dict, or a JSON file's path), for the
    same numbers run after run; shapes it lacks take 'plain'.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Union

from torch import nn

from twins_timm.optimize import decoders, layers
from twins_timm.optimize.kernels import KernelTable

__all__ = ['optimize', 'kernel_choices', 'calibration_report', 'KernelTable']

KernelSpec = Union[str, Path, Dict[str, str], KernelTable]


def _swaps() -> Dict[type, type]:
    """Plain class -> the class swapped in (and each swapped-in class to itself, for a new table)."""
    pairs = {**layers.SWAPS, **decoders.SWAPS}
    return {**pairs, **{fast: fast for fast in pairs.values()}}


def optimize(model: nn.Module, kernels: KernelSpec = 'auto') -> nn.Module:
    """Swap the CPU-inference layers into ``model`` (a Twins backbone, a segmenter, anything holding
    them) in place, with one kernel table for all of them, and return it.

    ``kernels``: 'auto' (measured), 'plain', 'rows', or saved choices (dict or JSON path; see the
    module's docstring). Optimizing again gives the layers a new table.
    """
    table = KernelTable.from_spec(kernels)
    swaps = _swaps()
    for module in model.modules():
        fast = swaps.get(type(module))
        if fast is not None:
            module.__class__ = fast
            if hasattr(fast, 'kernel_table'):
                module.kernel_table = table
            if hasattr(fast, 'optimized_children'):
                fast.optimized_children(module)
    return model


def _tables(model: nn.Module) -> List[KernelTable]:
    tables: List[KernelTable] = []
    for module in model.modules():
        table: Optional[KernelTable] = getattr(module, 'kernel_table', None)
        if isinstance(table, KernelTable) and all(table is not t for t in tables):
            tables.append(table)
    return tables


def kernel_choices(model: nn.Module) -> Dict[str, str]:
    """The choices an optimized ``model`` made so far (calibration key -> kernel): save it (e.g. as JSON)
    and pass it as ``optimize(model, kernels=...)`` to run with the same kernels again."""
    choices: Dict[str, str] = {}
    for table in _tables(model):
        choices.update(table.choices)
    return choices


def calibration_report(model: nn.Module) -> List[Dict]:
    """Every choice measured for ``model``: family, shape, chosen kernel, GFLOP/s of each candidate."""
    return [rec for table in _tables(model) for rec in table.report()]

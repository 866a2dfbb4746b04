"""When the layers ``twins_timm.optimize`` swaps in may leave the plain computation: eager CPU inference
(``fast_inference``) with no forward hook that would see a restructured call (``has_hooks``), so hooks
always see the full tensors. Nothing here runs on a GPU.

Private torch API used: ``torch.nn.modules.module._global_forward_hooks`` / ``_global_forward_pre_hooks``
(``has_hooks``): torch has no public reader of global hooks; a correctness check, not a speed-up.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules import module as module_mod

__all__ = ['fast_inference', 'has_hooks']


def fast_inference(x) -> bool:
    """Whether work on ``x`` may take the CPU-inference paths: eager CPU inference (no autograd)."""
    return (isinstance(x, torch.Tensor) and x.device.type == 'cpu' and not torch.is_grad_enabled()
            and x.dtype in (torch.float32, torch.bfloat16) and not torch.jit.is_scripting()
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


def has_hooks(*modules: nn.Module) -> bool:
    """Whether a forward hook (on these modules, their children or global) would see the call."""
    if module_mod._global_forward_hooks or module_mod._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for top in modules for m in top.modules())

"""The one device rule of every command and of training: ``'auto'`` is CUDA when there is one, else the CPU;
an unknown or absent device is a user error that names what to use instead."""
from __future__ import annotations

from typing import Optional, Union

import torch


def pick_device(name: Optional[Union[str, torch.device]] = 'auto') -> torch.device:
    """'auto' (or None) -> cuda when available, else cpu; refuse devices that are not there (ValueError)."""
    if name is None or name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError("unknown device %r; use 'cpu', 'cuda', 'cuda:N' or 'mps'" % (name,)) from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device %s: CUDA is not available on this machine; use --device cpu' % name)
    if device.type == 'cuda' and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError('--device %s: only %d CUDA device(s) present' % (name, torch.cuda.device_count()))
    if device.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise ValueError('--device mps: MPS is not available on this machine; use --device cpu')
    return device

"""Reading checkpoints without running pickled code, and hashing files.

``.pth`` files go through ``torch.load(weights_only=True)`` and ``.safetensors`` through safetensors; a file
that needs code to load is refused with a reason, a file that is not a checkpoint is named for what it is.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as st_load_file

from twins_timm.files.paths import PathLike

__all__ = ['SAFE_EXTRA_GLOBALS', 'UnsafeCheckpointError', 'CheckpointReadError', 'load_file', 'torch_load_safely',
           'sha256_file']

# Types a Twins training checkpoint pickles besides tensors and plain containers: the official
# classification script stores its argparse.Namespace under 'args'. Nothing else is allowed.
SAFE_EXTRA_GLOBALS = (argparse.Namespace,)


class UnsafeCheckpointError(ValueError):
    """The file needs code execution (a non-allow-listed pickled global) to load."""


class CheckpointReadError(ValueError):
    """The file is not a readable checkpoint (empty, truncated, corrupted or not a checkpoint)."""


def load_file(path: PathLike, progress: Optional[bool] = None) -> Any:
    """Load a ``.pth``/``.bin``/``.safetensors`` file without executing pickled code.

    Returns the raw object (dict of tensors, or a wrapper dict for ``.pth`` files).
    Raises UnsafeCheckpointError for pickles referencing code, CheckpointReadError for unreadable files.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError('checkpoint %s does not exist' % path)
    if path.is_dir():
        raise CheckpointReadError('%s is a directory; pass the checkpoint file inside it' % path)
    if not path.is_file():  # reading a device or a FIFO would never end (/dev/zero) or wait for a writer
        raise CheckpointReadError('%s is not a regular file (a device, FIFO or socket%s); pass the checkpoint file '
                                  'itself' % (path, ', reached through a symlink' if path.is_symlink() else ''))
    if path.stat().st_size == 0:
        raise CheckpointReadError('%s is empty (0 bytes): the download or copy probably failed; '
                                  'fetch the file again' % path)
    with open(path, 'rb') as f:
        head = f.read(9)
    if path.suffix == '.safetensors' or head[8:9] == b'{' and not head.startswith(b'PK'):
        return _load_safetensors(path)
    return _load_torch(path)


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        return st_load_file(str(path))  # memory-mapped
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointReadError('%s is not a valid safetensors file (%s); it may be truncated or corrupted, '
                                  'fetch it again' % (path, _first_line(e))) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


_UNSUPPORTED_GLOBAL = re.compile(r'\bGLOBAL ([\w.]+)')


def torch_load_safely(path: Path) -> Any:
    """Memory-mapped where the file allows it (zip format); old-style pickles are read whole."""
    with torch.serialization.safe_globals(list(SAFE_EXTRA_GLOBALS)):
        try:
            return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
        except RuntimeError as e:
            if 'mmap' not in str(e) and 'zipfile' not in str(e):
                raise
            return torch.load(path, map_location='cpu', weights_only=True)


def _load_torch(path: Path) -> Any:
    try:
        return torch_load_safely(path)
    except pickle.UnpicklingError as e:
        msg = str(e)
        m = _UNSUPPORTED_GLOBAL.search(msg)
        if m:  # the pickle references a Python global (class / function) outside the allow-list
            what = m.group(1)
            raise UnsafeCheckpointError(
                '%s was refused: loading it would execute or import %s, which is not a tensor, a plain '
                'container or an argparse.Namespace. twins-timm never unpickles code. If the file comes '
                'from a source you trust, re-save only its state dict (torch.save(sd, ...)) or export '
                'it to .safetensors, then convert that.' % (path, what)) from None
        raise CheckpointReadError('%s is not a PyTorch checkpoint (%s); it may be corrupted or in another '
                                  'format' % (path, _what_it_is(path) or _unpickler_reason(msg))) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, IndexError,
            KeyError, TypeError) as e:
        raise CheckpointReadError('%s could not be read as a PyTorch checkpoint (%s): the file is truncated, '
                                  'corrupted or not a checkpoint; fetch it again' % (path, _first_line(e))) from None


# file signatures of things people pass by mistake instead of a checkpoint
_SIGNATURES = ((b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'), (b'GIF8', 'a GIF image'),
               (b'%PDF', 'a PDF document'), (b'\x1f\x8b', 'a gzip archive'), (b'<', 'an HTML or XML page'),
               (b'{"', 'a JSON file'))


def _what_it_is(path: Path) -> Optional[str]:
    with open(path, 'rb') as f:
        head = f.read(8).lstrip()
    return next(('it is %s' % what for magic, what in _SIGNATURES if head.startswith(magic)), None)


def _unpickler_reason(msg: str) -> str:
    """The unpickler's own reason out of torch's long weights_only message (the first line otherwise)."""
    rest = msg.partition('WeightsUnpickler error:')[2] or msg
    return next((line.strip() for line in rest.splitlines() if line.strip()), 'unreadable pickle')


def sha256_file(path: PathLike) -> str:
    """The file's SHA-256 (hex), read in chunks."""
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()

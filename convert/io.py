"""Safe reading and atomic writing of checkpoints.

Reading never runs pickled code: ``.pth`` files go through ``torch.load(weights_only=True)`` and
``.safetensors`` through safetensors. Writing goes to a temporary sibling that is renamed over the
destination only when complete, so an error or a kill never leaves a half-written output.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch

PathLike = Union[str, os.PathLike]

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
    from safetensors import SafetensorError
    from safetensors.torch import load_file as st_load_file

    try:
        return st_load_file(str(path))  # memory-mapped
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointReadError('%s is not a valid safetensors file (%s); it may be truncated or corrupted, '
                                  'fetch it again' % (path, _first_line(e))) from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


_UNSUPPORTED_GLOBAL = re.compile(r'\bGLOBAL ([\w.]+)')


def _torch_load(path: Path) -> Any:
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
        return _torch_load(path)
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
    with open(path, 'rb') as f:
        return hashlib.file_digest(f, 'sha256').hexdigest()


# ----------------------------------------------------------------------------------- atomic writing
# Temporaries are hidden siblings made by tempfile, named after the destination and the writer's pid so
# that the next writer of the same destination can tell a dead writer's leftovers from a live one's.
_PARTIAL_PREFIX = '.%s.partial-%d-'
_PARTIAL_RE = r'^\.%s\.partial-(\d+)-\w+$'


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _remove_stale_partials(dst: Path) -> None:
    """Remove temp files/folders left by an earlier writer of the same destination that was killed."""
    if not dst.parent.is_dir():
        return
    pattern = re.compile(_PARTIAL_RE % re.escape(dst.name))
    for p in dst.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            _remove(p)


def check_destination(dst: PathLike, force: bool) -> Path:
    """Refuse an existing destination unless ``force``; return it as a Path."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not force:
        raise FileExistsError('%s already exists; choose another output path or pass --force '
                              '(overwrite=True) to replace it' % dst)
    return dst


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (/proc), else set-and-restore."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: PathLike) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open`` would have.

    tempfile makes files 0600 and folders 0700 (so do some writers, e.g. safetensors' ``save_file``);
    outputs must be readable wherever the user's umask says so, e.g. by a container under another uid.
    """
    mask = current_umask()
    path = Path(path)
    items = [path] + (sorted(path.rglob('*')) if path.is_dir() else [])
    for p in items:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(dst: PathLike, force: bool = False, folder: bool = False) -> Iterator[Path]:
    """Yield a new temporary sibling of ``dst`` to fill (an empty file, or an empty folder if ``folder``);
    on success it is renamed onto ``dst`` with ``os.replace``.

    The result gets the modes the umask gives (see ``honour_umask``). On any exception the temporary is
    removed and ``dst`` is untouched. A killed process leaves only a hidden ``.NAME.partial-PID-*``
    sibling, which the next write to the same destination removes.
    """
    dst = check_destination(dst, force)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(dst)
    prefix = _PARTIAL_PREFIX % (dst.name, os.getpid())
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if not folder and tmp.stat().st_size == 0:  # e.g. a writer that added its own suffix to the name
            raise OSError('internal error: nothing was written to %s' % tmp)
        check_destination(dst, force)  # it may have appeared meanwhile
        honour_umask(tmp)
        if folder and dst.exists():
            if not dst.is_dir():
                raise NotADirectoryError('%s is a file; refusing to replace it with a folder' % dst)
            old = tmp.with_name(tmp.name + '-old')  # unique because tmp is
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            if dst.is_dir() and not folder:
                raise IsADirectoryError('%s is a folder; refusing to replace it with a file' % dst)
            os.replace(tmp, dst)
    finally:
        if tmp.exists():
            _remove(tmp)


def _fsync(path: Path) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def save_safetensors(state_dict: Mapping[str, torch.Tensor], dst: PathLike, force: bool = False,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    from safetensors.torch import save_file

    with atomic_path(dst, force) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        _fsync(tmp)
    return Path(dst)


def save_torch(obj: Any, dst: PathLike, force: bool = False) -> Path:
    with atomic_path(dst, force) as tmp:
        torch.save(obj, tmp)
        _fsync(tmp)
    return Path(dst)


def write_folder(dst: PathLike, fill: Callable[[Path], None], force: bool = False) -> Path:
    """Build a folder with ``fill(tmp_dir)`` and move it into place atomically."""
    with atomic_path(dst, force, folder=True) as tmp:
        fill(tmp)
    return Path(dst)

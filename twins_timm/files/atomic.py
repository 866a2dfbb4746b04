"""Atomic writing: every output goes to a temporary sibling that is renamed over the destination only when
complete, so an error, a full disk or a kill never leaves a half-written output, and an existing destination is
replaced only with ``force`` and only if it is an earlier output of ours (``twins_timm.files.ownership``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import torch
import safetensors.torch

from twins_timm.files.disk import DiskFullError, disk_full_message, free_bytes, is_disk_full
from twins_timm.files.ownership import SAFETENSORS_FORMAT, folder_not_ours, mmseg_not_ours, safetensors_not_ours
from twins_timm.files.paths import PathLike, check_replaceable

__all__ = ['pid_alive', 'check_destination', 'current_umask', 'honour_umask', 'atomic_path', 'state_dict_bytes',
           'save_safetensors', 'save_torch', 'write_folder']

# Temporaries are hidden siblings made by tempfile, named after the destination and the writer's pid so
# that the next writer of the same destination can tell a dead writer's leftovers from a live one's.
_PARTIAL_PREFIX = '.%s.partial-%d-'
_PARTIAL_RE = r'^\.%s\.partial-(\d+)-\w+$'


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (one of another user counts): a live writer's temporaries are left alone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points at) or a folder of ours."""
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)


def _remove_stale_partials(dst: Path) -> None:
    """Remove temp files/folders left by an earlier writer of the same destination that was killed."""
    if not dst.parent.is_dir():
        return
    pattern = re.compile(_PARTIAL_RE % re.escape(dst.name))
    for p in dst.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            _remove(p)


def check_destination(dst: PathLike, force: bool, not_ours: Optional[Callable[[Path], Optional[str]]] = None,
                      what: str = 'the output') -> Path:
    """Refuse an existing destination unless ``force`` and ``not_ours`` finds it an earlier twins-timm output
    (any regular file without ``not_ours``); never a symbolic link. Returns it as a Path."""
    dst = Path(dst)
    if dst.exists() or dst.is_symlink():
        check_replaceable(dst, what, force, not_ours)
    return dst


def _written_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob('*') if p.is_file())
    return path.stat().st_size if path.exists() else 0


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


def _make_parents(folder: Path) -> List[Path]:
    """Create ``folder`` and its missing parents; returns those created (to take back after a failure)."""
    created = []
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    for d in reversed(created):
        d.mkdir(exist_ok=True)
    return created


@contextlib.contextmanager
def atomic_path(dst: PathLike, force: bool = False, folder: bool = False,
                not_ours: Optional[Callable[[Path], Optional[str]]] = None,
                needed: Optional[int] = None) -> Iterator[Path]:
    """Yield a new temporary sibling of ``dst`` to fill (an empty file, or an empty folder if ``folder``);
    on success it is renamed onto ``dst`` with ``os.replace``.

    An existing ``dst`` is replaced only with ``force`` and only if ``not_ours`` finds it an earlier output
    (see :func:`check_destination`). The result gets the modes the umask gives (see ``honour_umask``). On any
    exception the temporary (and any folder made for it) is removed and ``dst`` is untouched; a full disk
    becomes a :class:`DiskFullError` that says how much was needed (``needed``, an estimate, or what was
    written) and free. A killed process leaves only a hidden ``.NAME.partial-PID-*`` sibling, which the next
    write to the same destination removes.
    """
    not_ours = not_ours or (folder_not_ours if folder else None)
    dst = check_destination(dst, force, not_ours)
    created = _make_parents(dst.parent)
    _remove_stale_partials(dst)
    prefix = _PARTIAL_PREFIX % (dst.name, os.getpid())
    tmp, free = None, None
    try:
        free = free_bytes(dst.parent)
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dst.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=prefix, dir=dst.parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        if not folder and tmp.stat().st_size == 0:  # e.g. a writer that added its own suffix to the name
            raise OSError('internal error: nothing was written to %s' % tmp)
        check_destination(dst, force, not_ours)  # it may have appeared meanwhile
        honour_umask(tmp)
        if folder and dst.exists():
            old = tmp.with_name(tmp.name + '-old')  # unique because tmp is; dst is a real folder of ours
            os.replace(dst, old)
            os.replace(tmp, dst)
            _remove(old)
        else:
            if dst.is_dir() and not folder:
                raise IsADirectoryError('%s is a folder; refusing to replace it with a file' % dst)
            os.replace(tmp, dst)
    except Exception as e:
        if not is_disk_full(e, dst.parent):
            raise
        written = _written_bytes(tmp) if tmp is not None else 0
        raise DiskFullError(errno.ENOSPC, disk_full_message(dst, max(needed or 0, written) or None, free)) from None
    finally:
        if tmp is not None and tmp.exists():
            _remove(tmp)
        if not dst.exists():
            for d in created:  # innermost first; only if nothing else was put there meanwhile
                with contextlib.suppress(OSError):
                    d.rmdir()


def _fsync(path: Path) -> None:
    with open(path, 'rb') as f:
        os.fsync(f.fileno())


def state_dict_bytes(state_dict: Mapping[str, torch.Tensor]) -> int:
    """What the tensors take on disk, about: the space a writer checks for first."""
    return sum(v.numel() * v.element_size() for v in state_dict.values())


def save_safetensors(state_dict: Mapping[str, torch.Tensor], dst: PathLike, force: bool = False,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """A .safetensors file marked as ours in its metadata; with ``force`` it replaces only such a file."""
    metadata = dict(metadata or {}, format=SAFETENSORS_FORMAT)
    with atomic_path(dst, force, not_ours=safetensors_not_ours, needed=state_dict_bytes(state_dict)) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
        _fsync(tmp)
    return Path(dst)


def save_torch(obj: Any, dst: PathLike, force: bool = False,
               not_ours: Optional[Callable[[Path], Optional[str]]] = mmseg_not_ours,
               needed: Optional[int] = None) -> Path:
    """A torch file; with ``force`` it replaces only one ``not_ours`` recognises (an mmseg file of ours)."""
    with atomic_path(dst, force, not_ours=not_ours, needed=needed) as tmp:
        torch.save(obj, tmp)
        _fsync(tmp)
    return Path(dst)


def write_folder(dst: PathLike, fill: Callable[[Path], None], force: bool = False,
                 needed: Optional[int] = None) -> Path:
    """Build a folder with ``fill(tmp_dir)`` and move it into place atomically; with ``force`` it replaces
    only a folder twins-timm wrote (see :func:`folder_not_ours`), never a user's folder or a link."""
    with atomic_path(dst, force, folder=True, not_ours=folder_not_ours, needed=needed) as tmp:
        fill(tmp)
    return Path(dst)

"""A full disk as one clear error: refused before the work when an output cannot fit, recognised when a write
fills it (whatever the writer raised), and told with the file system, what was needed and what was free.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Optional

from twins_timm.files.paths import PathLike

__all__ = ['DiskFullError', 'DISK_FULL_ERRNOS', 'free_bytes', 'is_disk_full', 'disk_full_message', 'check_free_space']


class DiskFullError(OSError):
    """The file system ran out of space (or quota) while writing; nothing was left behind."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what writers that do not raise an OSError say: safetensors (Rust's io::Error), torch.save (only "write failed")
_DISK_FULL_TEXT = ('No space left', 'Disk quota exceeded', 'StorageFull', 'QuotaExceeded')
_NEARLY_FULL = 16 << 20  # bytes: less than this left after a failed write means the write filled the disk


def free_bytes(folder: Path) -> int:
    """Bytes free for this user on ``folder``'s file system (the one place that asks: tests stand in here)."""
    return shutil.disk_usage(folder).free


def is_disk_full(e: BaseException, folder: Path) -> bool:
    """Whether ``e``, raised by a write into ``folder``, means the disk (or quota) is full."""
    if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
        return True
    text = str(e)
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    try:
        return 'write failed' in text and free_bytes(folder) < _NEARLY_FULL
    except OSError:
        return False


def _file_system(folder: Path) -> str:
    """'/dev/sda1 (mounted at /data)' for the file system holding ``folder``, as well as it can be told."""
    mount = Path(os.path.realpath(folder))
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        with open('/proc/self/mounts') as f:
            devices = [line.split()[0] for line in f if line.split()[1:2] == [str(mount)]]
    except OSError:
        devices = []
    return '%s (mounted at %s)' % (devices[-1], mount) if devices else str(mount)


def _size(n: Optional[int]) -> str:
    if n is None:
        return '?'
    for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
        if n >= scale:
            return '%.1f %s' % (n / scale, unit)
    return '%d bytes' % n


def disk_full_message(dst: Path, needed: Optional[int], free: Optional[int]) -> str:
    space = ('needed ~%s, free %s' % (_size(needed), _size(free)) if needed
             else 'needed more than the %s that were free' % _size(free))
    return ('no space left on %s for %s: %s. It was not written and nothing partial is left; free some space '
            '(or quota) or choose an output on another disk' % (_file_system(dst.parent), dst, space))


def check_free_space(dst: PathLike, needed: int) -> None:
    """Before the work: refuse an output that cannot fit on its disk (``needed`` bytes, an estimate)."""
    dst = Path(dst)
    folder = Path(_nearest_existing_dir(dst.parent))
    free = free_bytes(folder)
    if free < needed:
        raise DiskFullError(errno.ENOSPC, disk_full_message(dst, needed, free))


def _nearest_existing_dir(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder

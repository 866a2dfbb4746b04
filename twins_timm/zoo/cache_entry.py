"""A converted folder in the zoo cache, checked before use, and the lock that lets one process fill it.

The weights' size and sha256 are recorded at conversion (``zoo_entry.json`` in the folder). The size is
checked on every use, the sha256 on the first use in a process (and again whenever the file changes): a
truncated or overwritten cache file is an error that says how to fetch it again, not wrong predictions.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

RECORD = 'zoo_entry.json'
LOCKS = '.locks'
_hashed: Dict[str, Tuple[int, int, int]] = {}   # weights path -> (inode, size, mtime_ns) whose sha256 matched


def write_record(folder: Path, weights: str, source_url: str, sha256: Optional[str] = None) -> None:
    """Record the weights file's size and sha256 (the writer's, or computed now) inside ``folder``."""
    from twins_timm.files.checkpoint import sha256_file
    size = (folder / weights).stat().st_size
    sha256 = sha256 or sha256_file(folder / weights)
    (folder / RECORD).write_text(json.dumps({'weights': weights, 'size': size, 'sha256': sha256,
                                             'source_url': source_url}, indent=2) + '\n')


def problem(folder: Path, weights: str, full: bool = True) -> Optional[str]:
    """What is wrong with the entry in ``folder`` (None: it is usable). ``full``: check the sha256 too,
    once per process and file version."""
    from twins_timm.files.checkpoint import sha256_file
    path = folder / weights
    try:
        record = json.loads((folder / RECORD).read_text())
        expected_size, expected_sha = int(record['size']), str(record['sha256'])
    except FileNotFoundError:
        return 'it has no %s (an incomplete or older entry)' % RECORD
    except (OSError, ValueError, KeyError, TypeError):
        return 'its %s is unreadable' % RECORD
    try:
        st = path.stat()
    except OSError:
        return '%s is missing' % weights
    if st.st_size != expected_size:
        return '%s has %d bytes, %d were written (truncated or changed)' % (weights, st.st_size, expected_size)
    version = (st.st_ino, st.st_size, st.st_mtime_ns)
    if not full or _hashed.get(str(path)) == version:
        return None
    if sha256_file(path) != expected_sha:
        return '%s is not the file that was written: its sha256 differs (overwritten or damaged)' % weights
    _hashed[str(path)] = version
    return None


@contextlib.contextmanager
def locked(root: Path, key: str, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold the lock of entry ``key`` (one file per entry under ``root/.locks``); call ``waiting()``
    once if another process holds it (it is fetching the same entry: then its result is used)."""
    from filelock import FileLock, Timeout

    (root / LOCKS).mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCKS / (key.replace(os.sep, '_') + '.lock')))
    try:
        lock.acquire(timeout=0.5)
    except Timeout:
        waiting()
        lock.acquire()
    try:
        yield
    finally:
        lock.release()

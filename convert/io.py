"""Safe reading and atomic writing of checkpoints.

Reading never runs pickled code: ``.pth`` files go through ``torch.load(weights_only=True)`` and
``.safetensors`` through safetensors. Writing goes to a temporary sibling that is renamed over the
destination only when complete, so an error or a kill never leaves a half-written output.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

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
    if dst.exists() or dst.is_symlink():  # imported only then: a writer in a bare process stays light
        from twins_timm.files.paths import check_replaceable
        check_replaceable(dst, what, force, not_ours)
    return dst


# -------------------------------------------------------------------- what marks an output as ours
# Every folder twins-timm writes holds only these files (Hub folders from `convert` and the zoo cache; training
# checkpoints add theirs), and its config.json names a twins-timm model: a timm folder from `convert` carries a
# 'twins_timm' entry, a segmenter folder the adapter class that save_pretrained records.
HUB_FOLDER_FILES = frozenset({'config.json', 'model.safetensors', 'README.md'})
OUR_FOLDER_FILES = HUB_FOLDER_FILES | {'recipe.json', 'training_state.pt'}
OUR_SEGMENTER_CLASSES = frozenset({'TwinsUPerNet', 'TwinsFPN'})
SAFETENSORS_FORMAT = 'twins_timm'  # the 'format' metadata of a .safetensors file that `convert` writes


def folder_not_ours(path: Path, names: frozenset = OUR_FOLDER_FILES) -> Optional[str]:
    """Why ``path`` is not a folder twins-timm wrote, holding only ``names`` (None: it is one, and replacing it
    loses nothing else)."""
    if not path.is_dir() or path.is_symlink():
        return 'not a folder'
    entries = sorted(path.iterdir())
    foreign = [p.name for p in entries if p.name not in names or p.is_symlink() or not p.is_file()]
    if foreign:
        return 'it holds %s' % ', '.join(foreign[:3]) + (', ...' if len(foreign) > 3 else '')
    try:
        cfg = json.loads((path / 'config.json').read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return 'it has no readable config.json'
    if not isinstance(cfg, dict) or not ('twins_timm' in cfg or cfg.get('_model_class') in OUR_SEGMENTER_CLASSES):
        return 'its config.json is not that of a twins-timm model'
    return None


def hub_folder_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not a Hub folder that `convert` (or the zoo) wrote: a training checkpoint is not one."""
    return folder_not_ours(path, HUB_FOLDER_FILES)


def safetensors_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not a .safetensors file that `twins-timm convert` wrote (its metadata says so)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
    except Exception:  # safetensors raises its own error types for foreign files
        return 'not a safetensors file'
    return None if meta.get('format') == SAFETENSORS_FORMAT else 'no twins-timm metadata in it'


def mmseg_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not an mmseg checkpoint that `twins-timm convert --to mmseg` wrote."""
    try:
        obj = _torch_load(path)
    except Exception:  # anything torch cannot read safely is not ours
        return 'not a checkpoint twins-timm can read safely'
    ours = isinstance(obj, dict) and set(obj) == {'meta', 'state_dict'} and isinstance(obj['meta'], dict) \
        and isinstance(obj['meta'].get('twins_timm'), dict)
    return None if ours else 'no twins-timm entry in its meta'


# ------------------------------------------------------------------------------------------ disk full
class DiskFullError(OSError):
    """The file system ran out of space (or quota) while writing; nothing was left behind."""


_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what writers that do not raise an OSError say: safetensors (Rust's io::Error), torch.save (only "write failed")
_DISK_FULL_TEXT = ('No space left', 'Disk quota exceeded', 'StorageFull', 'QuotaExceeded')
_NEARLY_FULL = 16 << 20  # bytes: less than this left after a failed write means the write filled the disk


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _is_disk_full(e: BaseException, folder: Path) -> bool:
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        return True
    text = str(e)
    if any(t in text for t in _DISK_FULL_TEXT):
        return True
    try:
        return 'write failed' in text and _free_bytes(folder) < _NEARLY_FULL
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
    free = _free_bytes(folder)
    if free < needed:
        raise DiskFullError(errno.ENOSPC, disk_full_message(dst, needed, free))


def _nearest_existing_dir(folder: Path) -> Path:
    folder = Path(os.path.abspath(folder))
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


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
        free = _free_bytes(dst.parent)
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
        if not _is_disk_full(e, dst.parent):
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
    return sum(v.numel() * v.element_size() for v in state_dict.values())


def save_safetensors(state_dict: Mapping[str, torch.Tensor], dst: PathLike, force: bool = False,
                     metadata: Optional[Dict[str, str]] = None) -> Path:
    """A .safetensors file marked as ours in its metadata; with ``force`` it replaces only such a file."""
    from safetensors.torch import save_file

    metadata = dict(metadata or {}, format=SAFETENSORS_FORMAT)
    with atomic_path(dst, force, not_ours=safetensors_not_ours, needed=state_dict_bytes(state_dict)) as tmp:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(tmp), metadata=metadata)
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

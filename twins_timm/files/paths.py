"""Output-path checks shared by every command: run before any model loads, so mistakes cost nothing.

* :func:`check_writable_dir` / :func:`check_output_file` prove that a folder (or the folder of a file)
  can take new files by creating and removing a probe file there -- the only test that also holds for
  root, read-only mounts and pseudo file systems such as /proc, where ``os.access`` says yes.
* :func:`refuse_inputs_as_outputs` makes sure no planned output is one of the command's inputs (nor a folder
  holding one), with or without --force (``twins_timm.zoo.resolve.model_files`` lists the files a --model reads).
* :func:`check_replaceable` lets --force replace only what twins-timm wrote before, never a link.

Torch-free on purpose: the command line imports it while building its parser.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

PathLike = Union[str, os.PathLike]


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(folder: PathLike, what: str) -> None:
    """Raise a clear error unless new files can be created in ``folder`` (created later if missing)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError('%s %s is a file, not a folder; give a folder path' % (what, folder))
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise NotADirectoryError('%s %s cannot be created: %s is a file, not a folder' % (what, folder, base))
    try:
        fd, probe = tempfile.mkstemp(prefix='.twins-timm-probe-', dir=str(base))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        where = 'in it' if base == Path(os.path.abspath(folder)) else 'in %s, where it would be created' % base
        raise PermissionError('%s %s is not writable: cannot create a file %s (%s); choose another '
                              'folder' % (what, folder, where, e.strerror or e)) from None


def check_output_file(path: PathLike, what: str, force: bool = False,
                      not_ours: Optional[Callable[[Path], Optional[str]]] = None) -> None:
    """A file output: not an existing folder, replaceable (see :func:`check_replaceable`), its folder writable."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise IsADirectoryError('%s %s is a folder; give a file path' % (what, path))
    check_replaceable(path, what, force, not_ours)
    check_writable_dir(path.parent, '%s %s: its folder' % (what, path))


def check_replaceable(path: PathLike, what: str, force: bool,
                      not_ours: Optional[Callable[[Path], Optional[str]]] = None) -> None:
    """Refuse an existing ``path`` unless ``force`` and it is a twins-timm output.

    ``not_ours(path)`` says why an existing path is not an earlier output of the same writer (None: it is);
    without it, any regular file counts. A symbolic link is never replaced: a dangling one would be found
    only when the writer renames its result over it, a live one points at something that is not ours.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise FileExistsError('%s %s already exists; pass --force to replace it (only an earlier twins-timm '
                              'output is replaced) or choose another path' % (what, path))
    if path.is_symlink():
        raise FileExistsError('%s %s is a symbolic link (to %s); twins-timm never replaces a link, even with '
                              '--force. Give the path it points to, or another one' % (what, path, os.readlink(path)))
    problem = not_ours(path) if not_ours is not None else (None if path.is_file() else 'not a regular file')
    if problem:
        raise FileExistsError('%s %s was not written by twins-timm (%s), so --force does not replace it; '
                              'move it away yourself or choose another path' % (what, path, problem))


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def inside(inner: PathLike, folder: PathLike) -> bool:
    """Whether ``inner`` is the existing folder ``folder`` or lies in it (links resolved)."""
    return folder.is_dir() and Path(os.path.realpath(inner)).is_relative_to(os.path.realpath(folder))


def refuse_inputs_as_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike],
                             hint: Optional[str] = None) -> None:
    """Raise ValueError if any planned output is one of the inputs (same file, links resolved) or an
    existing folder holding one (replacing it would delete the input).

    This holds with or without --force: no command writes over what it reads.
    """
    inputs = [Path(p) for p in inputs]
    for out in outputs:
        out = Path(out)
        for inp in inputs:
            if _same_file(out, inp) or inside(inp, out):
                raise ValueError('the output %s would overwrite the input %s; twins-timm never writes over '
                                 'its inputs, even with --force. %s'
                                 % (out, inp, hint or 'Choose another output path.'))

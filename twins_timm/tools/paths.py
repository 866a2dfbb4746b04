"""Output-path checks shared by every command: run before any model loads, so mistakes cost nothing.

* :func:`check_writable_dir` / :func:`check_output_file` prove that a folder (or the folder of a file)
  can take new files by creating and removing a probe file there -- the only test that also holds for
  root, read-only mounts and pseudo file systems such as /proc, where ``os.access`` says yes.
* :func:`refuse_inputs_as_outputs` makes sure no planned output is one of the command's inputs, with or
  without --force.

Torch-free on purpose: the command line imports it while building its parser.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

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


def check_output_file(path: PathLike, what: str, force: bool = False) -> None:
    """A file output: not an existing folder, not existing unless ``force``, its folder writable."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError('%s %s is a folder; give a file path' % (what, path))
    if path.exists() and not force:
        raise FileExistsError('%s %s already exists; pass --force to replace it or choose another path'
                              % (what, path))
    check_writable_dir(path.parent, '%s %s: its folder' % (what, path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(os.path.realpath(a)) == Path(os.path.realpath(b))


def refuse_inputs_as_outputs(outputs: Iterable[PathLike], inputs: Iterable[PathLike],
                             hint: Optional[str] = None) -> None:
    """Raise ValueError if any planned output is one of the inputs (same file, links resolved).

    This holds with or without --force: no command writes over what it reads.
    """
    inputs = [Path(p) for p in inputs]
    for out in outputs:
        out = Path(out)
        for inp in inputs:
            if _same_file(out, inp):
                raise ValueError('the output %s would overwrite the input %s; twins-timm never writes over '
                                 'its inputs, even with --force. %s'
                                 % (out, inp, hint or 'Choose another output path.'))

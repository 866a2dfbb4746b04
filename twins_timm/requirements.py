"""The oldest timm twins_timm works with, checked when the package is imported.

Older timm lacks layers and helpers the model imports, and before 1.0.26 timm's ``load_checkpoint`` unpickles
with ``weights_only=False`` (a checkpoint could run code): a clear error at import instead of an ImportError
from deep inside, or a silently unsafe loader. The minimum is setup.cfg's ``timm>=`` (read from the installed
package's metadata, so it is stated in one place); uninstalled source trees are not checked.
"""
from __future__ import annotations

import re
from importlib import metadata
from typing import Optional, Tuple

DIST = 'twins-timm'


def _release(version: str) -> Tuple[int, ...]:
    """(1, 0, 26) for '1.0.26', '1.0.26.dev0', '1.0.26rc1'."""
    return tuple(int(p) for p in re.findall(r'\d+', version.split('+')[0].split('rc')[0].split('.dev')[0])[:3])


def required_timm() -> Optional[str]:
    """The ``timm>=`` minimum of the installed twins-timm (None when it is not installed)."""
    try:
        requires = metadata.requires(DIST) or []
    except metadata.PackageNotFoundError:
        return None
    for req in requires:
        m = re.match(r'timm\s*>=\s*([\w.]+)', req)
        if m:
            return m.group(1)
    return None


def check_timm() -> None:
    """Raise an ImportError saying what to do when the installed timm is older than setup.cfg allows."""
    need = required_timm()
    try:
        have = metadata.version('timm')
    except metadata.PackageNotFoundError:
        return  # the import of timm itself will say so
    if need and _release(have) < _release(need):
        raise ImportError(f'twins_timm needs timm>={need}, but timm {have} is installed: pip install "timm>={need}" '
                          '(older timm lacks what the model uses, and its load_checkpoint unpickles with '
                          'weights_only=False)')

"""The ``twins-timm`` console script's entry point, installed as the top-level package ``twins_timm_launcher``.

Starting the command line through ``twins_timm.cli`` would first run ``twins_timm/__init__.py``, which
registers the six models with timm and so imports torch and timm (3-4 s): too slow for ``--help``,
``--version`` and a mistyped command.  This package sits outside ``twins_timm``: it finds the package's
folder without importing it and runs ``twins_timm/cli.py`` (a module with no package-relative imports)
under its usual name.  The package itself is imported when a command runs, not before.
"""
import importlib.util
import os
import sys
from typing import List, Optional


def _load_cli():
    if 'twins_timm.cli' in sys.modules:
        return sys.modules['twins_timm.cli']
    package = importlib.util.find_spec('twins_timm')  # finds the folder; does not run __init__.py
    path = os.path.join(list(package.submodule_search_locations)[0], 'cli.py')
    spec = importlib.util.spec_from_file_location('twins_timm.cli', path)
    module = importlib.util.module_from_spec(spec)
    sys.modules['twins_timm.cli'] = module
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[List[str]] = None) -> int:
    return _load_cli().main(argv)

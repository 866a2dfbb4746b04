"""The package's shape: nothing inside it imports the root package, and a regular install holds every package.

The one-way order of the packages is import-linter's layers contract (setup.cfg, run by .ci/run); what it cannot
express is checked here, from the source (no import).
"""
from __future__ import annotations

import ast
import configparser
from pathlib import Path
from typing import Iterator, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = 'twins_timm'

# Known offenders, each removed by the helper named: the test fails once one is gone, to drop it from here.
PENDING = {}  # module -> why it may still import the root package, until it is fixed


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / 'setup.cfg')
    return cfg


def _package_dirs() -> dict:
    """Installed package name -> its folder in the repository (setup.cfg's packages and package_dir)."""
    cfg = _setup_cfg()
    mapped = dict(line.strip().split(' = ') for line in cfg['options']['package_dir'].strip().splitlines())
    out = {}
    for name in cfg['options']['packages'].split():
        base = next((b for b in sorted(mapped, key=len, reverse=True) if name == b or name.startswith(b + '.')), None)
        rest = name[len(base):].lstrip('.').split('.') if base else name.split('.')
        out[name] = ROOT.joinpath(mapped[base] if base else '', *[p for p in rest if p])
    return out


def _modules() -> Iterator[tuple]:
    """(module name, source file, is a package __init__) of every module the install holds under twins_timm."""
    for package, folder in _package_dirs().items():
        if package == PACKAGE or package.startswith(PACKAGE + '.'):
            for f in sorted(folder.glob('*.py')):
                name = package if f.name == '__init__.py' else '%s.%s' % (package, f.stem)
                yield name, f, f.name == '__init__.py'


def _root_exports() -> Set[str]:
    """Names the root __init__ binds by importing: ``from twins_timm import X`` of one of them runs the root."""
    tree = ast.parse((ROOT / PACKAGE / '__init__.py').read_text())
    return {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom) for a in node.names}


def _submodules() -> Set[str]:
    return {name.split('.')[1] for name, _, _ in _modules() if name.count('.') >= 1}


def root_imports(source: str, module: str, is_package: bool, submodules: Set[str], exports: Set[str]) -> List[str]:
    """The imports in ``source`` (module ``module``) that reach the root package itself, not a submodule of it:
    ``import twins_timm``, ``from twins_timm import NAME`` of what the root binds, and their relative forms."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += ['l.%d import %s' % (node.lineno, a.name) for a in node.names if a.name == PACKAGE]
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(node, module, is_package)
            if target == PACKAGE:
                found += ['l.%d from %s import %s' % (node.lineno, target, a.name) for a in node.names
                          if a.name not in submodules or a.name in exports]
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> Optional[str]:
    if not node.level:
        return node.module
    parts = module.split('.')[:len(module.split('.')) - node.level + (1 if is_package else 0)]
    return '.'.join(parts + ([node.module] if node.module else []))


def test_the_checker_sees_root_imports():
    subs, exports = {'zoo', 'optimize', 'models'}, {'optimize', 'Twins'}
    code = ('import twins_timm\nimport twins_timm.models.twins\nfrom twins_timm import zoo\n'
            'from twins_timm import optimize, Twins\nfrom .. import zoo\nfrom .. import Twins\n')
    assert root_imports(code, 'twins_timm.convert.build', False, subs, exports) == [
        'l.1 import twins_timm', 'l.4 from twins_timm import optimize', 'l.4 from twins_timm import Twins',
        'l.6 from twins_timm import Twins']
    assert root_imports('from . import zoo', 'twins_timm.adapters', True, subs, exports) == []


def test_nothing_inside_the_package_imports_the_root_package():
    """The root package is the public API, above every layer: a module importing it would depend on them all
    (and register models, import optimize, ... as a side effect). Import the submodule that holds the thing."""
    subs, exports = _submodules(), _root_exports()
    found = {name: hits for name, f, is_package in _modules() if name != PACKAGE
             for hits in [root_imports(f.read_text(), name, is_package, subs, exports)] if hits}
    assert {k: v for k, v in found.items() if k not in PENDING} == {}
    assert set(PENDING) <= set(found), 'fixed: remove %s from PENDING' % sorted(set(PENDING) - set(found))


@pytest.mark.parametrize('folder', [ROOT / PACKAGE, ROOT / 'adapters', ROOT / 'convert'])
def test_a_regular_install_holds_every_package(folder):
    """setup.cfg lists its packages one by one: a folder left out is missing from a regular (non-editable)
    install, and from the import-linter contract that CI runs on one."""
    listed = {Path(p).resolve() for p in _package_dirs().values()}
    packages = {p.parent.resolve() for p in folder.rglob('__init__.py')}
    assert packages and sorted(map(str, packages - listed)) == []

"""`twins-timm` command line: one entry point, one module per sub-command.

Each sub-command module exposes ``DESCRIPTION``, ``EPILOG`` (examples), ``add_arguments(parser)``
and ``run(args) -> int``.  A command's module is imported only when that command is given, so
``twins-timm --help``, ``--version`` and a mistyped command read the one-line descriptions from the
modules' source (no import, no torch); command modules keep heavy imports inside ``run()``.

Exit codes: 0 done; 1 done in part (e.g. ``segment`` skipped images it could not decode: listed at the
end); 2 a user error, shown as one paragraph without a traceback -- nothing was done; 130 interrupted.
"""
from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import os
import sys
import textwrap
from typing import List, Optional

# command name -> module implementing it
COMMANDS = {
    'convert': 'twins_timm.commands.convert',
    'segment': 'twins_timm.commands.segment',
    'eval': 'twins_timm.commands.evaluate',
    'bench': 'twins_timm.commands.bench',
    'export': 'twins_timm.commands.export',
    'models': 'twins_timm.commands.models',
    'train': 'twins_timm.commands.train',
}

# Errors that mean "the input or the request is wrong": shown as one paragraph, exit code 2.
# Anything else (KeyError, RuntimeError, ...) is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError)

DESCRIPTION = 'Twins-PCPVT / Twins-SVT for timm and segmentation-models-pytorch.'
EPILOG = "Run 'twins-timm COMMAND --help' for a command's options and examples."


def _module_file(module_name: str) -> Optional[str]:
    """Source file of ``module_name`` found without importing it or its parent packages."""
    parts = module_name.split('.')
    spec = importlib.util.find_spec(parts[0])
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        name, path = '.'.join(parts[:i + 1]), list(spec.submodule_search_locations)
        # the finders on sys.meta_path also know editable installs and package_dir remaps
        spec = next((s for s in (getattr(f, 'find_spec', lambda *a: None)(name, path) for f in sys.meta_path)
                     if s is not None), None)
    return spec.origin if spec is not None else None


def command_summary(module_name: str) -> str:
    """First line of a command module's DESCRIPTION (or docstring), read from its source."""
    try:
        path = _module_file(module_name)
        with open(path, encoding='utf-8') as f:
            tree = ast.parse(f.read())
    except (OSError, TypeError, SyntaxError, ValueError, ImportError):
        return ''
    text = ast.get_docstring(tree) or ''
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'DESCRIPTION' for t in node.targets)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            text = node.value.value
    return text.strip().splitlines()[0] if text.strip() else ''


def _version() -> str:
    from importlib import metadata
    versions = []
    for dist in ('twins-timm', 'torch', 'timm', 'segmentation-models-pytorch'):
        try:
            versions.append('%s %s' % (dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            versions.append('%s (not installed)' % dist)
    return '%s (%s)' % (versions[0], ', '.join(versions[1:]))


def top_parser() -> argparse.ArgumentParser:
    """The top-level parser: commands listed with their one-line descriptions, nothing imported."""
    parser = argparse.ArgumentParser(prog='twins-timm', description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # one-line --version
    parser.add_argument('--version', action='version', version=_version())
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, module_name in COMMANDS.items():
        sub.add_parser(name, help=command_summary(module_name), add_help=False)
    return parser


def command_parser(name: str):
    """(parser, module) of one command; imports that command's module only."""
    module = importlib.import_module(COMMANDS[name])
    parser = argparse.ArgumentParser(
        prog='twins-timm %s' % name,
        description=module.DESCRIPTION,
        epilog=getattr(module, 'EPILOG', None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(parser)
    return parser, module


def _unknown_command(typed: str) -> int:
    close = difflib.get_close_matches(typed, list(COMMANDS), n=1)
    print('twins-timm: error: unknown command %r; the commands are %s.%s Run twins-timm --help for '
          'what each does.' % (typed, ', '.join(COMMANDS), " Did you mean '%s'?" % close[0] if close else ''),
          file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        top_parser().print_help(sys.stderr)
        return 2
    if argv[0].startswith('-'):  # --help, --version, or a mistake: argparse answers and exits
        args = top_parser().parse_args(argv)
        top_parser().print_help(sys.stderr)
        return 2
    name = argv[0]
    if name not in COMMANDS:
        return _unknown_command(name)
    parser, module = command_parser(name)
    args = parser.parse_args(argv[1:])
    args.command = name
    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:  # the reader went away (`twins-timm models | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # as Python's docs advise: no flush error
        return 0
    except USER_ERRORS as e:
        msg = ' '.join((str(e) or e.__class__.__name__).split())
        # lines break only at spaces: paths and commands in the message stay whole, ready to copy
        print(textwrap.fill('twins-timm %s: error: %s' % (name, msg), 100, break_long_words=False,
                            break_on_hyphens=False), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('twins-timm: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())

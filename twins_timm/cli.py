"""`twins-timm` command line: one entry point, one module per sub-command.

Each sub-command module exposes ``DESCRIPTION``, ``EPILOG`` (examples), ``add_arguments(parser)``
and ``run(args) -> int``; modules are imported only when their command runs, so ``--help`` and
unrelated commands stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import List, Optional

# command name -> module implementing it
COMMANDS = {
    'convert': 'twins_timm.convert.cli',
    'segment': 'twins_timm.tools.segment',
    'eval': 'twins_timm.tools.evaluate',
    'bench': 'twins_timm.tools.bench',
    'train': 'twins_timm.tools.train',
}

# Errors that mean "the input or the request is wrong": shown as one paragraph, exit code 2.
# Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, KeyError)


def _build_parser(command: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='twins-timm',
        description='Twins-PCPVT / Twins-SVT for timm and segmentation-models-pytorch.',
    )
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, module_name in COMMANDS.items():
        if command is not None and name != command:
            sub.add_parser(name, add_help=False)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(
            name,
            help=module.DESCRIPTION.splitlines()[0],
            description=module.DESCRIPTION,
            epilog=getattr(module, 'EPILOG', None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    if command is None and not any(a in ('-h', '--help') for a in argv):
        _build_parser(None).print_help()
        return 2
    parser = _build_parser(command)
    args = parser.parse_args(argv)
    if not hasattr(args, '_run'):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as e:
        msg = str(e) or e.__class__.__name__
        print('twins-timm %s: error: %s' % (args.command, textwrap.fill(msg, 100)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('twins-timm: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())

"""The ``twins-timm`` sub-commands: one module each, ``DESCRIPTION``, ``EPILOG``, ``add_arguments(parser)`` and
``run(args) -> int`` (see ``twins_timm/cli.py``). They parse, check the request before any work, and call the
library; the work itself lives in the packages below them (docs/architecture.md)."""

# --device of every command, checked by twins_timm.inference.devices.pick_device (the one device rule)
DEVICE_HELP = "torch device: 'cpu', 'cuda', 'cuda:1', 'mps' (default: cuda if available)"

"""File and network plumbing every layer may use: output path rules (``paths``), atomic writing (``atomic``), full
disks (``disk``), what marks an output as ours (``ownership``), the pickle-free checkpoint reader (``checkpoint``),
bounded downloads (``download``).

Nothing here knows about models; it is the bottom of the package's import order (docs/architecture.md).
"""

"""File and network plumbing every layer may use: path rules for outputs, bounded downloads.

Nothing here knows about models; it is the bottom of the package's import order (docs/architecture.md).
"""

"""Shared test set-up: the ``slow`` marker.

``python -m pytest -m "not slow"`` is the quick first check (every module and command, small
variants only); CI runs everything.  Slow are, by rule rather than by hand so that new tests follow:
the mmsegmentation parity, deploy (export) and bench files, the base / large variants of tests
parametrised over all six models (the small ones of the same test stay in the quick set), and a few
single tests over a minute long.
"""
from __future__ import annotations

import re

import pytest

SLOW_FILES = (
    'test_mmseg_parity_heads.py',
    'test_mmseg_parity_models.py',
    'test_mmseg_parity_official.py',
    'test_deploy.py',
    'test_bench.py',
)
# single tests that took over a minute in a full run (--durations), where a faster sibling covers the same code
SLOW_TESTS = (
    'test_short_fine_tuning_lowers_the_loss',
    'test_folders_load_offline_from_a_local_hf_cache',
    'test_grad_checkpointing_recomputes_and_gives_same_gradients',
)
# a parametrisation id naming a base or large variant: twins_svt_base, pcpvt-large-fpn, alt_gvt_base, ...
SLOW_VARIANT = re.compile(r'(?:pcpvt|svt|gvt)[_-](?:base|large)')


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, 'callspec', None), 'id', '')
        if (item.path.name in SLOW_FILES or item.originalname in SLOW_TESTS
                or SLOW_VARIANT.search(params)):
            item.add_marker(pytest.mark.slow)

"""Slow tests are marked where they are written (``pytestmark`` in a slow file, ``@pytest.mark.slow`` on a test);
for parametrisations over the six models or the manifests, ``larger_variants_slow`` marks the base / large ones,
so the small variant of the same test stays in the quick set (``-m "not slow"``)."""
from __future__ import annotations

import re
from typing import Iterable, List

import pytest

# a base or large variant: twins_svt_base, pcpvt-large-fpn, alt_gvt_base, ...
LARGER_VARIANT = re.compile(r'(?:pcpvt|svt|gvt)[_-](?:base|large)')


def larger_variants_slow(values: Iterable) -> List:
    return [pytest.param(v, marks=pytest.mark.slow) if LARGER_VARIANT.search(str(v)) else v for v in values]

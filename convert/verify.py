"""Verifying job: the converted model against timm's own Twins, and written weights read back bit for bit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import timm.models.twins as timm_twins  # timm's own Twins, the reference: not our registration
import torch
from safetensors.torch import load_file as load_st
from torch import nn

from twins_timm.convert.build import load_into, make_for


def reference_parity(res, model: Optional[nn.Module] = None, size: int = 224,
                     seed: int = 0) -> Optional[Dict[str, Any]]:
    """Max abs difference between the converted model and timm's own Twins on a seeded input.

    Only where timm's Twins *is* the source family's computation (timm, official classification, and
    families whose settings are all timm defaults); None otherwise.
    """
    if res.is_segmenter or res.model_args:
        return None
    sd = res.state_dict
    if any(v.is_floating_point() and v.dtype != torch.float32 for v in sd.values()):  # compare in float32
        sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
        model = None
    if model is None:
        model = load_into(lambda device=None: make_for(res, device), sd).eval()
    ref = load_into(lambda device=None: getattr(timm_twins, res.variant)(  # timm's own, not our registration
        pretrained=False, num_classes=res.num_classes, device=device), sd)
    if type(ref) is not timm_twins.Twins:
        return None
    ref.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    diff = float((ours.float() - theirs.float()).abs().max())
    return {'max_abs_diff': diff, 'reference': 'timm.models.twins.Twins', 'input': [1, 3, size, size],
            'text': 'max |converted - timm Twins| = %.2e on a seeded 1x3x%dx%d input (timm\'s Twins computes as '
                    'the official classification code)' % (diff, size, size)}



def verify_written(weights: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Read the written weights back and compare them to what was meant to be written."""
    got = load_st(str(weights))
    bad = sorted(set(got) ^ set(expected)) + [k for k in got if k in expected and not torch.equal(got[k], expected[k])]
    if bad:
        raise OSError('the written file %s does not read back identically (%s); the disk may be full or faulty'
                      % (weights, ', '.join(bad[:5])))

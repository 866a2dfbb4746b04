"""Official Twins segmentation checkpoints (mmseg 0.x) run through the same segmenters.

Their heads have mmseg 1.x's names and computation; their backbone is timm's plus SVT's per-stage
norms, with the official numerics (FORMATS.md). Test files come from the real files' manifests
with seeded random values; the converted model's logits must equal mmseg's own heads (loaded
with the file's head weights) applied to our backbone's maps.
"""
import pytest
import torch
import torch.nn.functional as F

import mmseg_reference as ref
from checkpoint_factory import write_checkpoint

pytestmark = pytest.mark.slow  # the whole file: mmseg parity: minutes

CASES = [('official/upernet_alt_gvt_s', 'twins_svt_small', 'svt', 'upernet'),
         ('official/fpn_pcpvt_s', 'twins_pcpvt_small', 'pcpvt', 'fpn')]


@pytest.mark.parametrize('manifest,variant,family,head', CASES)
def test_official_segmentation_checkpoint(manifest, variant, family, head, tmp_path):
    ref.require_mmseg()
    from mmseg.registry import MODELS

    from twins_timm.convert import build_model, convert_checkpoint
    from twins_timm.models.twins import checkpoint_family_args

    path = write_checkpoint(manifest, tmp_path / 'official.pth', seed=3)
    res = convert_checkpoint(path)
    assert (res.format, res.variant, res.task) == ('official_seg', variant, head)
    ours = build_model(res)
    assert ours.encoder_args == checkpoint_family_args('official_seg', variant)
    assert ours.class_names[0] == 'class_000'  # names and palette from the file's meta

    cfg = ref.model_config(family, 'small', head)
    state = torch.load(path, weights_only=False)['state_dict']
    parts = ['decode_head'] + (['auxiliary_head'] if head == 'upernet' else ['neck'])
    theirs = {}
    for part in parts:
        theirs[part] = MODELS.build(cfg[part]).eval()
        theirs[part].load_state_dict(
            {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + '.')}, strict=True)

    h, w = 70, 100
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    feats = []
    hook = ours.encoder.register_forward_hook(lambda m, i, out: feats.append(out[-4:]))
    try:
        with torch.no_grad():
            logits = ours(x)
    finally:
        hook.remove()
    with torch.no_grad():
        ins = theirs['neck'](feats[0]) if head == 'fpn' else feats[0]
        expected = F.interpolate(theirs['decode_head'](ins), size=(h, w), mode='bilinear',
                                 align_corners=False)
    assert logits.shape == (1, 150, h, w)
    assert (logits - expected).abs().max().item() <= 1e-4
    if head == 'upernet':
        with torch.no_grad():
            aux_expected = theirs['auxiliary_head'](feats[0])
            assert (ours.aux_head(feats[0][2]) - aux_expected).abs().max().item() <= 1e-4

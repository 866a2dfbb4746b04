"""End to end against mmsegmentation: mmseg's own Twins ADE20K configs, seeded random weights,
saved as mmseg checkpoints, converted with our converter, compared with mmseg's whole-image
inference (`EncoderDecoder.encode_decode`).

Budget: the S models at 512x683 (ADE20K's short-side-512 size, not a multiple of 32: corner padding
in the patch embeddings, SVT windows padded in both dims, mask on, at every stage; the MLP's row chunks)
and at 96x128 (a multiple of 32: no patch-embedding padding, and FPN's scale heads meet at equal sizes,
the in-place sum without a resize); B and L at 70x100, where stage maps are padded by the patch
embedding (corner padding) and SVT windows are padded in both dims (mask on) in some stages and in one
dim only (mask off) in another. 512x512 adds no case to these (every stage map divisible, windows
padded in both dims as at 512x683) and is left out: the UPerNet at 512 is the suite's heaviest run;
the backbones at 512x512 against mmseg's are in test_backbone.py.
B / L checkpoints go to the converter as the in-memory `{'meta', 'state_dict'}` object instead of a
file (same content; the S tests cover reading files) to keep CI's disk traffic down.
"""
import pytest
import torch

import mmseg_reference as ref

LOGIT_TOL = 1e-4          # max abs diff of logits
FEATURE_REL_TOL = 2e-6    # max abs diff of each backbone map / its max abs value
FULL_SIZES = [(512, 683), (96, 128)]
SMALL_SIZES = [(70, 100)]

CONFIGS = [(f, s, h) for s in ref.SIZES for f in ref.FAMILIES for h in ref.HEADS]


def _convert(theirs, family, size, head, tmp_path):
    from twins_timm.convert import convert_checkpoint
    if size == 'small':
        src = ref.save_mmseg_checkpoint(theirs, tmp_path / f'twins_{family}-{size[0]}_{head}.pth')
    else:
        src = ref.mmseg_checkpoint_object(theirs)
    return convert_checkpoint(src), src


def _capture(module, store):
    return module.register_forward_hook(lambda mod, inp, out: store.append(list(out)[-4:]))


def _compare(theirs, ours, head, h, w):
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    their_feats, our_feats = [], []
    hooks = [_capture(theirs.backbone, their_feats), _capture(ours.encoder, our_feats)]
    try:
        expected = ref.reference_logits(theirs, x)
        with torch.no_grad():
            logits = ours(x)
    finally:
        for hook in hooks:
            hook.remove()

    for stage, (a, b) in enumerate(zip(our_feats[0], their_feats[0]), start=1):
        assert a.shape == b.shape, f'{h}x{w} stage {stage}: {tuple(a.shape)} vs mmseg {tuple(b.shape)}'
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel <= FEATURE_REL_TOL, f'{h}x{w} stage {stage}: relative diff {rel:.2e}'
    assert logits.shape == expected.shape == (1, 150, h, w)
    diff = (logits - expected).abs().max().item()
    assert diff <= LOGIT_TOL, f'{h}x{w}: logits max abs diff {diff:.2e}'
    if head == 'upernet':  # auxiliary head (training only), on the same maps
        with torch.no_grad():
            aux_expected = theirs.auxiliary_head(their_feats[0])
            aux = ours.aux_head(our_feats[0][2])
        aux_diff = (aux - aux_expected).abs().max().item()
        assert aux_diff <= LOGIT_TOL, f'{h}x{w}: auxiliary logits max abs diff {aux_diff:.2e}'
    return diff


@pytest.mark.parametrize('family,size,head', CONFIGS)
def test_converted_mmseg_model_matches_mmseg(family, size, head, tmp_path):
    ref.require_mmseg()
    from twins_timm.adapters import TwinsFPN, TwinsUPerNet
    from twins_timm.convert import build_model

    theirs = ref.build_reference(family, size, head, seed=7)
    res, _ = _convert(theirs, family, size, head, tmp_path)
    assert (res.format, res.family, res.size, res.task, res.num_classes) == \
        ('mmseg', family, size, head, 150)
    ours = build_model(res)
    assert isinstance(ours, TwinsUPerNet if head == 'upernet' else TwinsFPN)
    assert not ours.training
    assert (ours.aux_head is not None) == (head == 'upernet')
    assert ours.class_names[:3] == ['wall', 'building', 'sky'] and len(ours.palette) == 150

    for h, w in (FULL_SIZES if size == 'small' else SMALL_SIZES):
        _compare(theirs, ours, head, h, w)

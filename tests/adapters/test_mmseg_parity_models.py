"""End to end against mmsegmentation: mmseg's own Twins ADE20K configs, seeded random weights,
saved as mmseg checkpoints, converted with our converter, compared with mmseg's whole-image
inference (`EncoderDecoder.encode_decode`).

Budget: the S models at 257x513 (FPN) or 129x257 (UPerNet) and at 96x128, B and L at 70x100.
257x513 is the smallest size (searched) that keeps every case ADE20K's 512x683 had, at 2.6x fewer
pixels: not a multiple of 32, so every stage's patch embedding corner-pads (here in both dims: 65x129
-> 33x65 -> 17x33 -> 9x17), SVT windows padded in both dims (mask on) at every stage, PPM bins and the
top-down / final resizes at uneven ratios. The UPerNet S models take these cases at 129x257
(33x65 -> 17x33 -> 9x17 -> 5x9: padded both ways at every stage, PPM bins and resizes uneven, checked
below), a quarter of the pixels for a head whose 512-channel 3x3 fusion at stride 4 is most of the work. 96x128 keeps the divisible case (no
patch padding, FPN's scale heads meet at equal sizes). B and L at 70x100: stage maps padded by
the patch embedding (corner padding), SVT windows padded in both dims (mask on) in some stages and in
one dim only (mask off) in another. 512x512 adds no case to these (every stage map divisible, windows
padded in both dims) and is left out; the backbones at 512x512 against mmseg's are in test_backbone.py.
Each converted model is compared as built (plain: mmseg's computation) and after
``twins_timm.optimize(model)`` (every fast path taken), at the same tolerances.
B / L checkpoints go to the converter as the in-memory `{'meta', 'state_dict'}` object instead of a
file (same content; the S tests cover reading files) to keep CI's disk traffic down.
"""
import copy

import pytest
import torch

import mmseg_reference as ref

pytestmark = pytest.mark.slow  # the whole file: mmseg parity: minutes

LOGIT_TOL = 1e-4          # max abs diff of logits
FEATURE_REL_TOL = 2e-6    # max abs diff of each backbone map / its max abs value
FULL_SIZES = [(257, 513), (96, 128)]
UPERNET_FULL_SIZES = [(129, 257), (96, 128)]
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


def _compare(theirs, models, head, h, w):
    """Each of ``models`` (ours: plain, optimized) against mmseg at h x w, mmseg run once."""
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    their_feats = []
    hook = _capture(theirs.backbone, their_feats)
    try:
        expected = ref.reference_logits(theirs, x)
    finally:
        hook.remove()
    return max(_compare_one(theirs, their_feats, expected, ours, head, x) for ours in models)


def _compare_one(theirs, their_feats, expected, ours, head, x):
    h, w = x.shape[-2:]
    our_feats = []
    hook = _capture(ours.encoder, our_feats)
    try:
        with torch.no_grad():
            logits = ours(x)
    finally:
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


def test_upernet_size_pads_every_stage():
    """129x257: the UPerNet S models' size pads every stage's map in both dims, for the patch embeddings
    (odd) and for the 7x7 windows."""
    h, w = UPERNET_FULL_SIZES[0]
    maps = [(-(-h // 4), -(-w // 4))]
    while len(maps) < 4:
        maps.append((-(-maps[-1][0] // 2), -(-maps[-1][1] // 2)))
    assert all(h % 2 and w % 2 and h % 7 and w % 7 for h, w in maps), maps


@pytest.mark.parametrize('family,size,head', CONFIGS)
def test_converted_mmseg_model_matches_mmseg(family, size, head, tmp_path):
    ref.require_mmseg()
    from twins_timm.adapters import TwinsFPN, TwinsUPerNet
    from twins_timm.convert import build_model
    from twins_timm.optimize import optimize

    theirs = ref.build_reference(family, size, head, seed=7)
    res, _ = _convert(theirs, family, size, head, tmp_path)
    assert (res.format, res.family, res.size, res.task, res.num_classes) == \
        ('mmseg', family, size, head, 150)
    ours = build_model(res)
    assert isinstance(ours, TwinsUPerNet if head == 'upernet' else TwinsFPN)
    assert not ours.training
    assert (ours.aux_head is not None) == (head == 'upernet')
    assert ours.class_names[:3] == ['wall', 'building', 'sky'] and len(ours.palette) == 150

    sizes = SMALL_SIZES if size != 'small' else UPERNET_FULL_SIZES if head == 'upernet' else FULL_SIZES
    optimized = optimize(copy.deepcopy(ours))
    for h, w in sizes:
        _compare(theirs, [ours, optimized], head, h, w)

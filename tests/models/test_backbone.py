"""The six Twins backbones as timm models: registration, parity with timm, dense features, options."""
import copy
import textwrap

import pytest
import torch
import timm
from safetensors.torch import save_file

import twins_timm
from fresh_python import fresh_python
from numerics import FP32_TOL, max_diff, scaled_diff
from references import randomize_, seeded_model, timm_reference
from twins_timm.models.twins import Twins, checkpoint_family_args, window_attn_mask
from marks import larger_variants_slow

VARIANTS = [f'twins_{a}_{s}' for a in ('pcpvt', 'svt') for s in ('small', 'base', 'large')]
SMALL = ['twins_pcpvt_small', 'twins_svt_small']


def ours(name, seed=0, **kwargs):
    """Our model with seeded random weights (tests/references.py)."""
    return seeded_model(name, seed, **kwargs)


# ----------------------------------------------------------------------------------- registration

def test_import_registers_all_six_without_warnings():
    code = textwrap.dedent('''
        import timm, twins_timm
        for n in %r:
            m = timm.create_model(n, pretrained=False, device='meta')
            print(type(m).__module__)
    ''' % VARIANTS)
    res = fresh_python(code, warnings_as_errors=True)  # fresh timm and twins_timm imports, -W error
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ['twins_timm.models.twins'] * 6
    assert 'Overwriting' not in res.stderr


def test_registration_is_quiet_however_it_is_reached():
    """The warning filter sits where the models register (twins.py), not in the root package: registering again
    (a reload, as a second import path would) says nothing either."""
    res = fresh_python('import importlib, twins_timm.models.twins as t; importlib.reload(t); print("ok")',
                       warnings_as_errors=True)
    assert res.returncode == 0 and res.stdout.split() == ['ok'], res.stderr


def test_too_old_timm_is_a_clear_import_error(monkeypatch):
    """The floor is setup.cfg's timm>= (read from the installed metadata: one place); below it the import says
    what to do instead of failing deep inside (or loading checkpoints with an unpickling timm)."""
    import configparser
    from pathlib import Path

    from twins_timm import requirements
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).parents[2] / 'setup.cfg')
    floor = next(r.split('>=')[1] for r in setup['options']['install_requires'].split() if r.startswith('timm>='))
    assert requirements.required_timm() == floor  # after editing setup.cfg: pip install -e . again
    requirements.check_timm()  # the timm these tests run with is allowed
    monkeypatch.setattr(requirements.metadata, 'version', lambda name: '1.0.25')
    with pytest.raises(ImportError, match=r'needs timm>=%s, but timm 1\.0\.25 is installed: pip install' % floor):
        requirements.check_timm()


def test_pretrained_tags_are_timms():
    assert timm.models.model_entrypoint('twins_svt_small').__module__ == 'twins_timm.models.twins'
    tags = set(timm.list_pretrained('twins_*'))
    assert {f'{v}.in1k' for v in VARIANTS} <= tags
    for v in VARIANTS:
        cfg = timm.models.get_pretrained_cfg(f'{v}.in1k')
        assert cfg.hf_hub_id == f'timm/{v}.in1k'
        assert timm.models.is_model_pretrained(v)


def test_pretrained_file_overlay_loads_strictly(tmp_path):
    src = ours('twins_svt_small')
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    path = tmp_path / 'weights.safetensors'
    save_file(sd, str(path))
    m = timm.create_model('twins_svt_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())

    sd['blocks.0.0.extra'] = torch.zeros(1)
    save_file(sd, str(path))
    with pytest.raises(RuntimeError, match='blocks.0.0.extra'):
        timm.create_model('twins_svt_small', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_timm_hub_weights_load_offline_from_local_cache(tmp_path, hf_cache, hf_offline):
    import json
    src = ours('twins_pcpvt_small')
    sd = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    cfg = dict(architecture='twins_pcpvt_small', num_classes=1000,
               pretrained_cfg=dict(timm.models.get_pretrained_cfg('twins_pcpvt_small.in1k').to_dict()))
    (tmp_path / 'repo').mkdir()
    save_file(sd, str(tmp_path / 'repo' / 'model.safetensors'))
    (tmp_path / 'repo' / 'config.json').write_text(json.dumps(cfg))
    hf_cache(tmp_path / 'hub', 'timm/twins_pcpvt_small.in1k', tmp_path / 'repo')
    hf_offline(tmp_path / 'hub')
    for m in (timm.create_model('twins_pcpvt_small.in1k', pretrained=True),
              timm.create_model('hf-hub:timm/twins_pcpvt_small.in1k', pretrained=True)):
        assert type(m).__module__ == 'twins_timm.models.twins', type(m)
        assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------------- timm parity

# 112x112: square, windows unpadded at stride 4, 8, 16 (28, 14, 7; padded at 3x3), patch embeddings
# exact but the last. 250x333: not a multiple of 32 or of 7 * 32, so every patch embedding floors and
# windows pad in both dims (stride 4-16) or one (7x10 at 32). The same branches as 224
# and 250x333 took (224 took the unpadded / exact ones at one stage more: the same code), 72% of the pixels.
PARITY_SIZES = ((112, 112), (250, 333))
# Which cases run where. The S variants: batch 2 at both PARITY_SIZES (every branch above). B and L run the
# same code with other depths, dims, heads and MLP ratios, so one image at 250x333 keeps what is theirs:
# every weight mapped and used, every stage's output compared, padded windows / floored embeddings at
# their dims and heads.
PARITY_CASES = {name: (2, PARITY_SIZES) if name in SMALL else (1, PARITY_SIZES[1:]) for name in VARIANTS}


@pytest.fixture(scope='module', params=larger_variants_slow(VARIANTS))
def timm_parity(request, timm_pair):
    """Differences of ours from timm's Twins, same weights, at PARITY_CASES (batch, sizes): logits
    (``m(x)``) and the 4 maps (``forward_intermediates``), of our plain model ('plain') and of a copy with
    ``twins_timm.optimize(m)`` ('optimized': every fast path that differs from timm's).

    Each variant's pair is built once and timm's reference run once per size for both tests below:
    its logits are ``forward_head`` of the final tokens its ``forward_intermediates`` returns. Ours run
    the same way for B and L; for S also ``m(x)``, whose ``forward_features`` loop is the same code
    for every variant (depths and dims are data).
    """
    name = request.param
    m, ref = timm_pair(name)
    batch, sizes = PARITY_CASES[name]
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, *size, generator=gen) for size in sizes]
    expected = []
    with torch.no_grad():
        for x in xs:
            final, maps = ref.forward_intermediates(x)
            expected += [ref.forward_head(final)] + maps
    diffs = {}
    def run(x):
        if name in SMALL:
            return [m(x)] + m.forward_intermediates(x, intermediates_only=True)
        final, maps = m.forward_intermediates(x)
        return [m.forward_head(final)] + maps

    for mode in ('plain', 'optimized'):
        if mode == 'optimized':
            m = twins_timm.optimize(copy.deepcopy(m))
        with torch.no_grad():
            outs = [o for x in xs for o in run(x)]
        assert [o.shape for o in outs] == [o.shape for o in expected]
        diffs[mode] = max_diff(outs, expected), scaled_diff(outs, expected)
    return diffs


def test_optimized_model_has_timms_numbers(timm_parity):
    # the in-place GELU computes timm's GELU; FP32_TOL leaves room for another summation order
    assert timm_parity['optimized'][1] <= FP32_TOL


def test_plain_model_has_timms_bits(timm_parity):
    # the same modules and ops as timm's Twins in the same order: logits and the 4 maps bit for bit
    assert timm_parity['plain'][0] == 0


# ----------------------------------------------------------------------------- dense prediction

@pytest.mark.parametrize('name', SMALL)
def test_features_only_any_size(name):
    m = ours(name, features_only=True)
    info = m.feature_info
    assert info.reduction() == [4, 8, 16, 32]
    assert info.module_name() == ['blocks.0', 'blocks.1', 'blocks.2', 'blocks.3']
    assert info.channels() == ([64, 128, 320, 512] if 'pcpvt' in name else [64, 128, 256, 512])
    for h, w in ((32, 32), (33, 47), (250, 333)):
        with torch.no_grad():
            feats = m(torch.randn(2, 3, h, w))
        expect_h, expect_w = h // 4, w // 4
        for f, c in zip(feats, info.channels()):
            assert f.shape == (2, c, expect_h, expect_w)
            assert f.is_contiguous()
            expect_h, expect_w = expect_h // 2, expect_w // 2


def test_out_indices_honoured():
    m = ours('twins_svt_small', features_only=True, out_indices=(1, 3))
    assert m.feature_info.reduction() == [8, 32]
    feats = m(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in feats] == [128, 512]
    assert [f.shape[-1] for f in feats] == [12, 3]


@pytest.mark.parametrize('bad, message', [
    (torch.randn(1, 3, 31, 64), 'at least 32'),
    (torch.randn(1, 3, 64, 20), 'at least 32'),
    (torch.randn(3, 64, 64), '4-D image batch'),
    (torch.randn(1, 64, 64, 3), '3 input channels'),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), 'floating point'),
])
def test_bad_input_is_a_clear_value_error(bad, message):
    for m in (ours('twins_svt_small'), ours('twins_svt_small', features_only=True)):
        with pytest.raises(ValueError, match=message):
            m(bad)


def test_forward_intermediates_like_timm():
    from twins_timm.requirements import _release
    m = ours('twins_pcpvt_small')
    ref = timm_reference('twins_pcpvt_small', m.state_dict())
    x = torch.randn(2, 3, 96, 128)
    # timm's own Twins stops early since 1.0.31 (ours always does); before, it ran every stage regardless and
    # returned the normed last-stage tokens, so only the maps asked for compare with those releases
    ref_stops_early = _release(timm.__version__) >= (1, 0, 31)
    with torch.no_grad():
        for kwargs in (dict(indices=2), dict(indices=[0, 2]), dict(indices=[-1], norm=True),
                       dict(indices=[1], stop_early=True)):
            final, feats = m.forward_intermediates(x, **kwargs)
            ref_final, ref_feats = ref.forward_intermediates(x, **kwargs)
            assert len(feats) == len(ref_feats)
            assert scaled_diff(feats, ref_feats) <= FP32_TOL
            if kwargs.get('stop_early') and not ref_stops_early:
                assert torch.equal(final, feats[-1])  # stage 2's map, where it stopped
                continue
            assert final.shape == ref_final.shape
            assert scaled_diff(final, ref_final) <= FP32_TOL
        nhwc = m.forward_intermediates(x, indices=[0], output_fmt='NHWC', intermediates_only=True)[0]
        assert nhwc.shape == (2, 24, 32, 64)


def test_prune_intermediate_layers():
    m = ours('twins_svt_small')
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        full = m.forward_intermediates(x, intermediates_only=True)
    taken = m.prune_intermediate_layers(indices=(0, 1))
    assert taken == [0, 1]
    assert len(m.blocks) == 2 and len(m.patch_embeds) == 2 and len(m.pos_block) == 2
    assert isinstance(m.head, torch.nn.Identity) and isinstance(m.norm, torch.nn.Identity)
    assert m.num_features == 128
    with torch.no_grad():
        pruned = m.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        assert m(x).shape == (1, 64, 128)  # global_pool '' after pruning: tokens, as timm
    for a, b in zip(pruned, full[:2]):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------- family options

def test_checkpoint_family_args():
    assert checkpoint_family_args('timm', 'twins_svt_base') == {}
    assert checkpoint_family_args('official_seg', 'twins_svt_base') == dict(stage_norm=True, window_mask=True)
    assert checkpoint_family_args('official_seg', 'twins_pcpvt_base') == {}
    assert checkpoint_family_args('mmseg', 'twins_pcpvt_small') == dict(norm_eps=1e-5, patch_padding='corner')
    with pytest.raises(ValueError, match='unknown checkpoint family'):
        checkpoint_family_args('detectron', 'twins_svt_base')
    m = ours('twins_svt_small', **checkpoint_family_args('mmseg', 'twins_svt_small'))
    assert m.norm.eps == 1e-5 and m.blocks[2][3].norm1.eps == 1e-5 and m.stage_norms[3].eps == 1e-5
    assert m.patch_embeds[0].norm.eps == 1e-5 and m.blocks[0][1].attn.norm.eps == 1e-5
    assert ours('twins_svt_small').blocks[0][0].norm1.eps == 1e-6
    assert 'stage_norms.0.weight' in m.state_dict()
    with pytest.raises(ValueError, match='patch_padding'):
        timm.create_model('twins_svt_small', patch_padding='reflect')


def test_every_converter_format_has_its_family_facts_beside_the_model():
    from twins_timm.convert import FORMATS
    from twins_timm.models.families import FAMILY_ARGS

    assert set(FORMATS) == set(FAMILY_ARGS)  # a new format adds its entry (even an empty one) to both
    assert FORMATS['mmseg'].args_for('twins_svt_small') == checkpoint_family_args('mmseg', 'twins_svt_small')
    with pytest.raises(ValueError, match='not a Twins variant'):
        checkpoint_family_args('mmseg', 'vit_small')


def test_window_mask_quirk():
    # both pads > 0: pairs with exactly one padded token are masked
    mask = window_attn_mask(5, 6, 7, torch.device('cpu'), torch.float32)
    assert mask.shape == (1, 49, 49)
    pad = torch.zeros(7, 7)
    pad[5:, :] = 1
    pad[:, 6:] = 1
    pad = pad.flatten()
    expected = torch.where(pad[:, None] != pad[None, :], -1000.0, 0.0)
    assert torch.equal(mask[0], expected)

    for h, w in ((14, 10), (10, 14), (14, 14)):  # one pad == 0: the original's mask is uniform
        assert not window_attn_mask(h, w, 7, torch.device('cpu'), torch.float32).any()

    # ... i.e. plain zero padding -- same output as no mask
    torch.manual_seed(0)
    from twins_timm.models.twins import LocallyGroupedAttn
    plain = LocallyGroupedAttn(32, 2, ws=7).eval()
    masked = LocallyGroupedAttn(32, 2, ws=7, window_mask=True).eval()
    masked.load_state_dict(plain.state_dict())
    for h, w, same in ((14, 10, True), (10, 14, True), (10, 10, False), (14, 14, True)):
        x = torch.randn(2, h * w, 32)
        with torch.no_grad():
            diff = max_diff(plain(x, (h, w)), masked(x, (h, w)))
        assert (diff == 0) == same, (h, w, diff)


def test_stage_norm_is_inside_the_trunk():
    m = ours('twins_svt_small', stage_norm=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for norm in m.stage_norms:
            norm.weight.normal_()
        feats = m.forward_intermediates(x, intermediates_only=True)
        m.stage_norms[0].weight.mul_(2)
        changed = m.forward_intermediates(x, intermediates_only=True)
    # the stage-1 norm feeds stage 2: every later map changes
    assert all(max_diff(a, b) > 1e-3 for a, b in zip(feats, changed))


# -------------------------------------------------------------- independent reference: mmseg

@pytest.fixture(scope='module')
def mmseg_backbones():
    from mmseg_reference import model_config, require_mmseg
    require_mmseg()
    from mmseg.registry import MODELS
    from twins_timm.convert.engine import apply_rules
    from twins_timm.convert.formats import table_for
    out = {}
    for name in SMALL:
        family = 'svt' if '_svt_' in name else 'pcpvt'
        torch.manual_seed(0)
        ref = randomize_(MODELS.build(model_config(family, 'small', 'fpn')['backbone']), seed=1).eval()
        sd = apply_rules(table_for('mmseg', 'backbone'), ref.state_dict()).state_dict
        out[name] = (ref, sd)
    return out


def _rel_diffs(model, ref, x):
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        ref_feats = list(ref(x))
    assert [f.shape for f in feats] == [f.shape for f in ref_feats]
    return [max_diff(a, b) / b.abs().max().item() for a, b in zip(feats, ref_feats)]


def _ours_from(name, sd, **kwargs):
    m = timm.create_model(name, num_classes=0, device='meta', **kwargs).to_empty(device='cpu').eval()
    missing, unexpected = m.load_state_dict(sd, strict=False)
    assert sorted(missing) == ['norm.bias', 'norm.weight'] and not unexpected  # mmseg has no final norm
    return m


# Each size one case of the mmseg options (corner padding: ceil; window mask only when both dims pad):
# 128x128 divisible by 32 (no patch padding), windows padded in both dims at every stage (mask on);
# 224x256 divisible, windows padded in one dim at every stage (224 / 4 = 56 = 8 * 7: mask off);
# 250x333 not divisible: corner padding, windows padded in both dims, the MLP over row chunks.
# (512x512 and 448x640 took the first two cases at 4x-16x the pixels.)
MMSEG_SIZES = {'both_dims_pad': (128, 128), 'one_dim_pads': (224, 256), 'corner_padding': (250, 333)}


@pytest.mark.parametrize('name', SMALL)
@pytest.mark.parametrize('size', MMSEG_SIZES.values(), ids=MMSEG_SIZES.keys())
def test_mmseg_family_options_match_mmseg(mmseg_backbones, name, size):
    ref, sd = mmseg_backbones[name]
    m = _ours_from(name, sd, **checkpoint_family_args('mmseg', name))
    torch.manual_seed(2)
    rel = _rel_diffs(m, ref, torch.randn(2, 3, *size))
    assert max(rel) <= 2e-6, rel


@pytest.mark.parametrize('option, size', [
    ('norm_eps', MMSEG_SIZES['one_dim_pads']), ('stage_norm', MMSEG_SIZES['one_dim_pads']),
    ('window_mask', MMSEG_SIZES['both_dims_pad']), ('patch_padding', MMSEG_SIZES['corner_padding']),
])
def test_each_mmseg_option_is_needed(mmseg_backbones, option, size):
    """Dropping any one option breaks parity: the reference test above can fail for each of them."""
    name = 'twins_svt_small'
    ref, sd = mmseg_backbones[name]
    args = checkpoint_family_args('mmseg', name)
    args.pop(option)
    if option == 'stage_norm':
        sd = {k: v for k, v in sd.items() if not k.startswith('stage_norms.')}
    m = _ours_from(name, sd, **args)
    x = torch.randn(1, 3, *size)
    if option == 'patch_padding':
        with pytest.raises(AssertionError):
            _rel_diffs(m, ref, x)  # floor vs ceil: the maps don't even have the same size
    else:
        assert max(_rel_diffs(m, ref, x)) > 2e-6


# --------------------------------------------------------------------------------------- training

def test_drop_path_linear_decay():
    m = timm.create_model('twins_svt_small', drop_path_rate=0.3, device='meta')
    rates = [0.0 if isinstance(b.drop_path1, torch.nn.Identity) else b.drop_path1.drop_prob
             for stage in m.blocks for b in stage]
    expected = torch.linspace(0, 0.3, len(rates))
    assert torch.allclose(torch.tensor(rates), expected)
    assert rates[0] == 0 and abs(rates[-1] - 0.3) < 1e-7


@pytest.mark.slow  # a faster sibling covers the same code
@pytest.mark.parametrize('name', SMALL)
def test_grad_checkpointing_recomputes_and_gives_same_gradients(name):
    m = ours(name, drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 96)

    def grads(checkpointing):
        m.zero_grad()
        m.set_grad_checkpointing(checkpointing)
        calls = []
        blk = m.blocks[2][0]
        blk.forward = lambda *a, _f=type(blk).forward: calls.append(1) or _f(blk, *a)  # hooks skip re-computation
        sum(f.square().mean() for f in m.forward_intermediates(x, intermediates_only=True)).backward()
        del blk.forward
        return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}, len(calls)

    plain, plain_calls = grads(False)
    ckpt, ckpt_calls = grads(True)
    assert plain_calls == 1 and ckpt_calls == 2  # forward, then re-computed in backward
    assert plain.keys() == ckpt.keys() and len(plain) > 100
    for k in plain:
        assert torch.allclose(plain[k], ckpt[k], atol=1e-6, rtol=1e-5), k


def test_channels_last_input_accepted():
    m = ours('twins_svt_small')
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        assert max_diff(m(x), m(x.contiguous(memory_format=torch.channels_last))) <= 1e-6


def test_version():
    assert twins_timm.__version__
    assert isinstance(ours('twins_svt_small'), Twins)


def test_the_model_depends_on_neither_its_speed_ups_nor_the_environment():
    # one direction only: twins_timm.optimize builds on twins_timm.models; the model reads no environment
    # variable and keeps no global switch (its numbers are timm's wherever it runs)
    import ast
    from pathlib import Path

    import twins_timm.models
    for path in Path(twins_timm.models.__file__).parent.glob('*.py'):
        tree = ast.parse(path.read_text())
        imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imported += [n.module or '' for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in imported if 'optimize' in m or m == 'os'], path.name
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], path.name

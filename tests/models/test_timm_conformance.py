"""timm's own model conformance checks (timm 1.0.x tests/test_models.py), run on our Twins.

As timm checks them: TorchScript (`set_scriptable(True)`, `torch.jit.script`, forward), pruned features
scripted (`features_only` getter), `features_only` maps and `forward_intermediates` (channels, reductions,
equal to `forward_features`, with gradient checkpointing too), pruning leaving no unused parameters, FX
feature extraction (timm's `create_feature_extractor` with its no-trace modules and functions; forward
equal to eager, backward reaching every parameter, the FX graph scripted), `reset_classifier` in eval
mode (timm's `test_model_default_cfgs_non_std`); and timm's constructor arguments (`norm_layer`,
`block_cls`, `act_layer`). A tiny variant (``ONE_BLOCK_DEPTHS``) keeps them fast.
"""
import copy
import math
import warnings
from functools import partial

import pytest
import torch
import timm
import timm.models.twins as timm_twins
from timm.models import create_feature_extractor
from timm.models._features_fx import get_graph_node_names

import twins_timm  # noqa: F401  registers the Twins variants with timm
from references import ONE_BLOCK_DEPTHS
from twins_timm.models.twins import Twins

NAMES = ['twins_pcpvt_small', 'twins_svt_small']
SIZE = (1, 3, 64, 64)


@pytest.fixture(autouse=True)
def _no_script_deprecation_noise():
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*torch.jit.script. is deprecated', category=FutureWarning)
        yield


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **ONE_BLOCK_DEPTHS, **kwargs)
    assert isinstance(model, Twins)  # ours, not timm's own Twins
    return model


def _fx_model(model):
    """timm's test helper: the model as an FX graph (timm's no-trace modules as leaves), last node out."""
    train_nodes, eval_nodes = get_graph_node_names(model)
    return create_feature_extractor(model, [(train_nodes if model.training else eval_nodes)[-1]])


@pytest.mark.parametrize('name', NAMES)
def test_torchscript_forward(name):
    with timm.layers.set_scriptable(True):
        model = _model(name).eval()
    x = torch.randn(SIZE)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        out = scripted(x)
        assert out.shape == (1, 1000) and not torch.isnan(out).any()
        assert torch.allclose(out, model(x), atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_fx_forward_backward_and_script(name):
    model = _model(name, num_classes=42).eval()
    x = torch.randn(SIZE)
    fx = _fx_model(model).eval()
    with torch.no_grad():
        eager, traced = model(x), fx(x)
    traced = next(iter(traced.values())) if isinstance(traced, dict) else traced
    assert torch.allclose(traced, eager, atol=1e-5)

    model.train()
    fx_train = _fx_model(model).train()
    out = fx_train(torch.randn(2, 3, 64, 64))
    out = torch.cat(list(out.values())) if isinstance(out, dict) else out
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing and out.shape[-1] == 42

    scripted = torch.jit.script(fx.eval())
    with torch.no_grad():
        out = scripted(x)
    out = next(iter(out.values())) if isinstance(out, dict) else out
    assert torch.allclose(out, eager, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_reset_classifier_follows_the_training_mode(name):
    model = _model(name).eval()
    model.reset_classifier(7)
    assert not model.head.training  # timm: head.train(self.training)
    x = torch.randn(SIZE)
    out = model(x)
    assert out.shape == (1, 7)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    model.train().reset_classifier(3)
    assert model.head.training


@pytest.mark.parametrize('name', NAMES)
def test_pruned_features_torchscript(name):
    # timm's test: the feature getter prunes to stage 0 and TorchScript compiles forward_intermediates
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, features_only=True, feature_cls='getter', out_indices=(0,),
                              **ONE_BLOCK_DEPTHS).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)


@pytest.mark.parametrize('name', NAMES)
def test_features_only_maps_have_the_reported_channels_and_reductions(name):
    model = timm.create_model(name, features_only=True, **ONE_BLOCK_DEPTHS).eval()
    size = (96, 80)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, *size))
    channels, reductions = model.feature_info.channels(), model.feature_info.reduction()
    assert len(outputs) == len(channels) == 4
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[1] == c
        for got, full in zip(o.shape[-2:], size):
            assert full / (2 * r) < got <= math.ceil(full / r) + 1


@pytest.mark.parametrize('name', NAMES)
def test_forward_intermediates_as_timm_checks_it(name):
    model = _model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        output, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
        assert [o.shape[1] for o in intermediates] == info.channels()
        assert [96 // o.shape[-1] for o in intermediates] == info.reduction()
        torch.testing.assert_close(output, model.forward_features(x), rtol=1e-5, atol=1e-8)
    model.set_grad_checkpointing()
    output3, _ = model.forward_intermediates(x, output_fmt='NCHW')
    torch.testing.assert_close(output, output3, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('name', NAMES)
def test_pruning_leaves_no_unused_parameters(name):
    model = _model(name, drop_rate=0.5)
    x = torch.randn(2, 3, 64, 64)
    for indices, prune_norm in (([0], False), ([3], False), ([0, 1, 2, 3], True)):
        pruned = copy.deepcopy(model).train()
        take = pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        features = pruned.forward_intermediates(x, indices=take, norm=not prune_norm, intermediates_only=True)
        sum(f.sum() for f in features).backward()
        assert not [n for n, p in pruned.named_parameters() if p.grad is None]
        pruned = copy.deepcopy(model).eval()
        pruned.prune_intermediate_layers(indices, prune_norm=prune_norm)
        with torch.no_grad():
            assert torch.equal(pruned(x), pruned(x))


@pytest.mark.parametrize('name', NAMES)
def test_timms_constructor_arguments(name):
    x = torch.randn(1, 3, 64, 64)
    # timm's norm_layer: the block, final and stage norms take it
    model = _model(name, norm_layer=partial(torch.nn.LayerNorm, eps=1e-3), stage_norm=True)
    assert {m.eps for n, m in model.named_modules() if n.endswith(('norm1', 'norm2', 'stage_norms.0'))} == {1e-3}
    assert model.norm.eps == 1e-3
    # act_layer reaches the MLPs
    model = _model(name, act_layer=torch.nn.ReLU)
    assert all(type(b.mlp.act) is torch.nn.ReLU for stage in model.blocks for b in stage)
    # block_cls: timm's own Block builds the same model, with the same numbers
    ours = _model(name).eval()
    with_timms_blocks = _model(name, block_cls=timm_twins.Block).eval()
    assert type(with_timms_blocks.blocks[0][0]) is timm_twins.Block
    with_timms_blocks.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(with_timms_blocks(x), ours(x))
    with pytest.raises(ValueError, match='not both'):
        timm.create_model(name, norm_layer=torch.nn.LayerNorm, norm_eps=1e-5)

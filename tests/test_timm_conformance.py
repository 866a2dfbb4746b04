"""timm's own model conformance checks (timm 1.0.x tests/test_models.py), run on our Twins.

As timm checks them: TorchScript (`set_scriptable(True)`, `torch.jit.script`, forward), FX feature
extraction (timm's `create_feature_extractor` with its no-trace modules and functions; forward equal
to eager, backward reaching every parameter, the FX graph scripted), `reset_classifier` in eval mode
(timm's `test_model_default_cfgs_non_std`). A tiny variant (``ONE_BLOCK_DEPTHS``) keeps them fast.
"""
import warnings

import pytest
import torch
import timm
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

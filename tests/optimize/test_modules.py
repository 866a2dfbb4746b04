"""Layers stay layers: every parameterised layer is a module called as one, in training and inference.

What module-level tools rely on: forward hooks fire (feature taps, Grad-CAM), a replaced layer changes
the output, PEFT's LoRA on the attention and MLP linears changes the output and trains, BN folding keeps
the logits. Tiny models (one or two blocks per stage) on small inputs, each plain and optimized
(``twins_timm.optimize(model)``: every fast path), the inference
path a CPU user of the tools gets.
"""
import pytest
import torch
from torch import nn

import twins_timm  # noqa: F401  registers the Twins variants with timm
from builders import seeded
from numerics import FP32_TOL, scaled_diff
from references import perturb_batchnorm_, seeded_model
from twins_timm.adapters import TwinsFPN, TwinsUPerNet
from twins_timm.models.twins import checkpoint_family_args
from twins_timm.optimize import optimize
from twins_timm.optimize.layers import InplaceGELU

TINY = dict(depths=[2, 2, 2, 2])
NARROW_HEAD = {TwinsFPN: {}, TwinsUPerNet: dict(decoder_channels=64, aux_channels=32)}  # same layers, fewer FLOPs
LORA_TARGETS = r'.*\.(attn\.(qkv|q|kv|proj)|mlp\.(fc1|fc2))$'
OPTIMIZED = [False, True]  # the plain model, and optimized with every fast path


def _optimized(model, optimized):
    return optimize(model) if optimized else model


def _backbone(name='twins_svt_small', optimized=False):
    return _optimized(seeded_model(name, num_classes=5, **TINY), optimized)  # seeded random weights, eval mode


def _parameterised(model):
    return {n: m for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


def _fired(model, run):
    fired = set()
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: fired.add(n))
               for n, m in _parameterised(model).items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return fired


@pytest.mark.parametrize('name', ['twins_svt_small', 'twins_pcpvt_small'])
@pytest.mark.parametrize('mode', ['inference', 'no_grad', 'train'])
@pytest.mark.parametrize('optimized', OPTIMIZED)
def test_every_backbone_layer_fires_its_hooks(name, mode, optimized):
    model = _backbone(name, optimized).train(mode == 'train')
    x = torch.randn(1, 3, 32, 32)
    if mode == 'train':
        run = lambda: model(x).sum().backward()  # noqa: E731
    else:
        ctx = torch.inference_mode if mode == 'inference' else torch.no_grad

        def run():
            with ctx():
                model(x)
    assert _fired(model, run) == set(_parameterised(model))


@pytest.mark.parametrize('cls', [TwinsFPN, TwinsUPerNet])
@pytest.mark.parametrize('optimized', OPTIMIZED)
def test_every_segmenter_layer_fires_its_hooks(cls, optimized):
    torch.manual_seed(0)
    model = seeded(cls, encoder_name='twins_svt_small', classes=3,
                   encoder_args=dict(checkpoint_family_args('mmseg', 'twins_svt_small'), **TINY), **NARROW_HEAD[cls])
    model = _optimized(model, optimized)
    x = torch.randn(2, 3, 64, 64)  # two images: training BatchNorm of the 1x1 pooling needs them

    def run():
        with torch.inference_mode():
            model(x)
    expected = {n for n in _parameterised(model) if not n.startswith('aux_head')}  # aux: training only
    assert _fired(model, run) == expected
    model.train()
    assert _fired(model, lambda: model(x)[0].sum().backward()) == set(_parameterised(model))


class Zero(nn.Module):
    def __init__(self, out_features):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


@pytest.mark.parametrize('optimized', OPTIMIZED)
def test_replacing_a_layer_changes_the_inference_output(optimized):
    model = _backbone(optimized=optimized).eval()
    x = torch.randn(1, 3, 64, 64)  # stage 1 GSA sees 2x2 keys: a query matters
    with torch.inference_mode():
        before = model(x)
    for path in ['blocks.0.0.attn.qkv', 'blocks.0.0.attn.proj', 'blocks.0.1.attn.q', 'blocks.0.1.attn.kv',
                 'blocks.0.0.mlp.fc1', 'blocks.0.1.mlp.fc2']:
        parent, leaf = path.rsplit('.', 1)
        old = model.get_submodule(path)
        setattr(model.get_submodule(parent), leaf, Zero(old.out_features))
        with torch.inference_mode():
            after = model(x)
        setattr(model.get_submodule(parent), leaf, old)
        assert (after - before).abs().max() > 1e-5, path  # a bypassed layer would leave it bit-identical


@pytest.mark.parametrize('order', ['plain', 'optimized then LoRA', 'LoRA then optimized'])
def test_peft_lora_changes_the_output_and_trains(order):
    peft = pytest.importorskip('peft')
    model = _backbone(optimized=order == 'optimized then LoRA').eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        base = model(x)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    if order == 'LoRA then optimized':
        optimize(lora)  # the blocks around the wrapped layers get the optimized GELU
    wrapped = [n for n, m in lora.named_modules() if type(m).__name__ == 'Linear' and hasattr(m, 'lora_A')]
    n_linear = sum(1 for n, m in model.named_modules() if type(m) is nn.Linear and 'base_layer' in n)
    assert len(wrapped) == n_linear == (4 + 5) * 4  # per stage: LSA 4 + GSA 5 linears
    assert any(type(m) is InplaceGELU for m in lora.modules()) == (order != 'plain')
    with torch.inference_mode():
        adapted = lora(x)
    assert (adapted - base).abs().max() > 1e-4  # LoRA's update reaches the output in inference
    lora.train()
    lora(x).square().mean().backward()
    trainable = [(n, p) for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all('lora_' in n for n, _ in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)


@pytest.mark.parametrize('optimized', OPTIMIZED)
def test_fold_batchnorm_keeps_the_logits_and_refuses_training_mode(optimized):
    torch.manual_seed(0)
    model = seeded(TwinsUPerNet, encoder_name='twins_pcpvt_small', classes=3,
                   encoder_args=dict(depths=[1, 1, 1, 1]), **NARROW_HEAD[TwinsUPerNet]).train()
    model = _optimized(model, optimized)
    perturb_batchnorm_(model)
    with pytest.raises(ValueError, match='eval'):
        model.fold_batchnorm()
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode():
        before = model(x)
        model.fold_batchnorm()
        after = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.decoder.modules())  # the optimized convs fold too
    assert scaled_diff(after, before) <= FP32_TOL

"""Training with the segmenters: outputs, mmseg's loss, SyncBatchNorm, gradient checkpointing."""
import copy

import pytest
import torch
import torch.nn.functional as F

import twins_timm.models.twins as twins_module
from twins_timm.adapters import AUX_WEIGHT, MAIN_WEIGHT, TwinsFPN, TwinsUPerNet, mmseg_loss
from twins_timm.models.twins import checkpoint_family_args


def _model(cls=TwinsUPerNet, variant='twins_pcpvt_small', **kw):
    torch.manual_seed(0)
    args = dict(encoder_name=variant, classes=4, encoder_args=checkpoint_family_args('mmseg', variant))
    if cls is TwinsUPerNet:
        args.update(decoder_channels=64, aux_channels=32)
    args.update(kw)
    return cls(**args)


def _synthetic_batch(h=64, w=80):
    """Images whose label is which quadrant-ish colour blob a pixel is in (learnable, fixed)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.zeros(2, h, w, dtype=torch.long)
    target[:, h // 2:, :] = 1
    target[:, :, w // 2:] += 2
    x = F.one_hot(target, 4).permute(0, 3, 1, 2).float()[:, :3] * 2 - 1
    x = x + 0.3 * torch.randn(x.shape, generator=gen)
    target[:, :3, :] = 255  # an ignored border, as mmseg's padding label
    return x, target


def test_train_mode_returns_main_and_aux_logits():
    model = _model().train()
    x, _ = _synthetic_batch()
    main, aux = model(x)
    assert main.shape == aux.shape == (2, 4, 64, 80)
    assert model.loss_weights == (MAIN_WEIGHT, AUX_WEIGHT) == (1.0, 0.4)
    no_aux = _model(aux_head=False).train()
    assert no_aux.aux_head is None and isinstance(no_aux(x), torch.Tensor)
    fpn = _model(TwinsFPN).train()
    assert fpn.aux_head is None and fpn(x).shape == (2, 4, 64, 80)
    assert isinstance(model.eval()(x), torch.Tensor)  # eval: logits only


def test_mmseg_loss_weights_and_ignore():
    gen = torch.Generator().manual_seed(1)
    main, aux = torch.randn(2, 2, 4, 5, 6, generator=gen)
    target = torch.randint(0, 4, (2, 5, 6), generator=gen)
    target[0, 0] = 255
    per_pixel = lambda logits: F.cross_entropy(logits, target, ignore_index=255, reduction='none')
    # mmseg (avg_non_ignore=False): mean over all pixels, ignored ones count as zero
    expected = per_pixel(main).sum() / target.numel() + 0.4 * per_pixel(aux).sum() / target.numel()
    assert torch.allclose(mmseg_loss((main, aux), target), expected)
    assert torch.allclose(mmseg_loss(main, target), per_pixel(main).mean())
    with pytest.raises(ValueError, match='resize the labels'):
        mmseg_loss(main, target[:, :4])


@pytest.mark.slow  # a faster sibling covers the same code
def test_short_fine_tuning_lowers_the_loss():
    model = _model().train()
    x, target = _synthetic_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.01)
    losses = []
    for _ in range(8):
        loss = mmseg_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        pred = model(x).argmax(1)
    valid = target != 255
    assert (pred[valid] == target[valid]).float().mean() > 0.5


def test_sync_batchnorm_conversion():
    """timm's helper (the heads are timm ConvNormActs) makes a DDP-ready model with the same names and numerics."""
    from timm.layers import SyncBatchNormAct, convert_sync_batchnorm
    model = _model(TwinsFPN).eval()
    x, target = _synthetic_batch(48, 56)
    with torch.no_grad():
        expected = model(x)
    keys = list(model.state_dict())
    synced = convert_sync_batchnorm(model)
    kinds = {type(m) for m in synced.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert kinds == {SyncBatchNormAct}
    assert list(synced.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(synced.eval()(x), expected)
    synced.train()  # without a process group SyncBatchNorm computes plain batch statistics
    mmseg_loss(synced(x), target).backward()


def test_gradient_checkpointing_reaches_the_backbone(monkeypatch):
    x, target = _synthetic_batch(48, 64)

    def grads(model):
        model.train()
        torch.manual_seed(3)  # same dropout masks in both runs
        model.zero_grad()
        mmseg_loss(model(x), target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = _model()
    plain = grads(copy.deepcopy(model))
    calls = []
    original = twins_module.checkpoint
    monkeypatch.setattr(twins_module, 'checkpoint',
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model.set_grad_checkpointing(True)
    assert model.encoder.model.grad_checkpointing
    checkpointed = grads(model)
    assert len(calls) == sum(len(stage) for stage in model.encoder.model.blocks)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert torch.allclose(grad, checkpointed[name], rtol=1e-4, atol=1e-6), name
    model.set_grad_checkpointing(False)
    assert not model.encoder.model.grad_checkpointing


def test_freeze_encoder_trains_only_the_heads():
    model = _model(aux_head=False)
    model.freeze_encoder()
    model.train()
    x, target = _synthetic_batch(48, 48)
    mmseg_loss(model(x), target).backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.decoder.parameters())

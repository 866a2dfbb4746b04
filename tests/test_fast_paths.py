"""Every inference fast path of the backbone computes what the plain (training / autograd) path computes.

The fast paths: the MLP run over row chunks with the residual added in place (inference only), and the
window attention as batched matmuls. Chunk sizes are shrunk here so that small inputs take several
ragged chunks; the plain path is the same model with autograd recording (no chunking, no in-place).
"""
import pytest
import torch
import timm

import twins_timm.models.twins as twins_mod
from twins_timm.models.twins import Block, checkpoint_family_args

SIZES = [(64, 64), (97, 131), (250, 333)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(twins_mod, 'MLP_CHUNK_ELEMENTS', 1)
    monkeypatch.setattr(twins_mod, 'MLP_CHUNK_MIN_ROWS', 32)


def _model(name, family='timm', seed=0):
    torch.manual_seed(seed)
    args = checkpoint_family_args(family, name) if family != 'timm' else {}
    model = timm.create_model(name, **args).eval()
    with torch.no_grad():
        for p in model.parameters():  # move off the init's zero biases / unit norms
            p.add_(torch.randn_like(p) * .05)
    return model


def _count_fc1_calls(model):
    calls = []
    for m in model.modules():
        if isinstance(m, Block):
            m.mlp.fc1.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _plain(model, x):
    with torch.enable_grad():
        out = model.forward_intermediates(x.requires_grad_(), intermediates_only=True)
    return [o.detach() for o in out]


@pytest.mark.parametrize('name,family', [('twins_pcpvt_small', 'timm'), ('twins_svt_small', 'timm'),
                                         ('twins_svt_small', 'official_seg'), ('twins_pcpvt_small', 'mmseg')])
@pytest.mark.parametrize('size', SIZES)
def test_chunked_inference_equals_plain_path(small_chunks, name, family, size):
    model = _model(name, family)
    calls = _count_fc1_calls(model)
    x = torch.randn(2, 3, *size)
    plain = _plain(model, x.clone())
    n_plain = len(calls)
    with torch.inference_mode():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert len(calls) - n_plain > n_plain  # the inference run really went through row chunks
    for a, b in zip(fast, plain):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= 1e-5


def test_no_grad_also_takes_the_fast_path_and_leaves_input_alone(small_chunks):
    model = _model('twins_svt_small')
    x = torch.randn(1, 3, 96, 96)
    x0 = x.clone()
    plain = _plain(model, x.clone())
    calls = _count_fc1_calls(model)
    with torch.no_grad():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert len(calls) > sum(model.depths)
    assert torch.equal(x, x0)
    assert max((a - b).abs().max().item() for a, b in zip(fast, plain)) <= 1e-5


def test_training_mode_never_chunks(small_chunks):
    model = _model('twins_pcpvt_small').train()
    calls = _count_fc1_calls(model)
    with torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert len(calls) == sum(model.depths)


def test_default_chunking_at_512_matches_plain_path():
    # real chunk sizes: at 512x512 the first two stages' MLPs run in several chunks
    model = _model('twins_pcpvt_small')
    x = torch.randn(1, 3, 512, 512)
    calls = _count_fc1_calls(model)
    with torch.inference_mode():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert len(calls) > sum(model.depths)
    plain = _plain(model, x)
    assert max((a - b).abs().max().item() for a, b in zip(fast, plain)) <= 1e-5


@pytest.mark.parametrize('size', [(70, 70), (75, 90), (100, 64)])
def test_masked_window_attention_equals_reference_math(size):
    # official-segmentation mask, only where a window is padded: check against a direct computation
    from twins_timm.models.twins import LocallyGroupedAttn, window_attn_mask
    torch.manual_seed(0)
    attn = LocallyGroupedAttn(32, 2, ws=7, window_mask=True).eval()
    h, w = size[0] // 4, size[1] // 4
    x = torch.randn(2, h * w, 32)
    with torch.inference_mode():
        out = attn(x, (h, w))
        ws, hp, wp = 7, -(-h // 7) * 7, -(-w // 7) * 7
        xp = torch.nn.functional.pad(x.view(2, h, w, 32), (0, 0, 0, wp - w, 0, hp - h))
        win = xp.view(2, hp // ws, ws, wp // ws, ws, 32).transpose(2, 3).reshape(-1, ws * ws, 32)
        q, k, v = attn.qkv(win).view(win.shape[0], ws * ws, 3, 2, 16).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        if hp > h and wp > w:
            mask = window_attn_mask(h, w, ws, x.device, x.dtype).repeat(2, 1, 1)
            logits = logits + mask[:, None]
        ref = (logits.softmax(-1) @ v).transpose(1, 2).reshape(2, hp // ws, wp // ws, ws, ws, 32)
        ref = attn.proj(ref.transpose(2, 3).reshape(2, hp, wp, 32)[:, :h, :w].reshape(2, h * w, 32))
    assert (out - ref).abs().max().item() <= 1e-5

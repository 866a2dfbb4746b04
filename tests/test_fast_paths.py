"""Every inference fast path of the backbone computes what the plain (training / autograd) path computes.

The fast paths: linear layers through oneDNN (a 1x1 conv on a channels-last view), the MLP run over row
chunks with the residual added in place (inference only), and the window attention as batched matmuls.
Chunk sizes are shrunk here so that small inputs take several ragged chunks; the plain path is the same
model with autograd recording (F.linear, no chunking, no in-place). Differences are measured against
the output's scale (see numerics.py).
"""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import timm
from torch.overrides import TorchFunctionMode

import twins_timm.models.twins as twins_mod
from numerics import FP32_TOL, scaled_diff
from twins_timm.models.twins import Block, checkpoint_family_args, linear

SIZES = [(64, 64), (97, 131), (250, 333)]


_patch = pytest.MonkeyPatch()


@pytest.fixture(autouse=True)
def _undo_patches():
    yield
    _patch.undo()


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
    """fc1 applications: one per block on the plain path, one per chunk on the chunked one."""
    calls = []
    for m in model.modules():
        if isinstance(m, Block):
            m.mlp.fc1.register_forward_hook(lambda *a: calls.append(1))
    chunked = twins_mod._mlp_residual_by_rows

    def counting(*args, **kwargs):
        calls.extend([1] * args[8])
        return chunked(*args, **kwargs)
    _patch.setattr(twins_mod, '_mlp_residual_by_rows', counting)
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
    assert [a.shape for a in fast] == [b.shape for b in plain]
    assert scaled_diff(fast, plain) <= FP32_TOL


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
    assert scaled_diff(fast, plain) <= FP32_TOL


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
    assert scaled_diff(fast, plain) <= FP32_TOL


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


def test_chunked_mlp_operator_passes_opcheck():
    x = torch.randn(2, 50, 16)
    args = (torch.rand(16) + .5, torch.randn(16), 1e-6, torch.randn(64, 16), torch.randn(64),
            torch.randn(16, 64), torch.randn(16), 3)
    torch.library.opcheck(torch.ops.twins_timm.mlp_residual_by_rows.default, (x,) + args)
    out = torch.ops.twins_timm.mlp_residual_by_rows(x, *args)
    ln = torch.nn.functional.layer_norm(x, (16,), args[0], args[1], 1e-6)
    ref = x + torch.nn.functional.linear(torch.nn.functional.gelu(
        torch.nn.functional.linear(ln, args[3], args[4])), args[5], args[6])
    assert (out - ref).abs().max().item() <= 1e-5


def test_compiled_inference_calls_the_chunked_operator(small_chunks):
    # fullgraph: the chunk loop is one opaque operator in the captured graph, not a break or an unrolled loop
    model = _model('twins_svt_small')
    x = torch.randn(1, 3, 96, 96)
    plain = _plain(model, x.clone())
    targets = []

    def recording_backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    with torch.inference_mode():
        compiled = torch.compile(lambda t: model.forward_intermediates(t, intermediates_only=True),
                                 backend=recording_backend, fullgraph=True)
        out = compiled(x)
    assert sum('mlp_residual_by_rows' in t for t in targets) == sum(model.depths)  # every inference MLP
    assert scaled_diff(out, plain) <= FP32_TOL


# ------------------------------------------------------------------------------ oneDNN linear
class _CountCalls(TorchFunctionMode):
    """How often F.linear and F.conv2d are called (torch functions, seen before dispatch)."""

    def __init__(self):
        super().__init__()
        self.counts = {F.linear: 0, F.conv2d: 0}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.counts:
            self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def _calls(model, x, grad=False, exact=False):
    twins_mod.set_onednn_inference(not exact)
    try:
        with torch.set_grad_enabled(grad), _CountCalls() as mode:
            model.forward_intermediates(x, intermediates_only=True)
    finally:
        twins_mod.set_onednn_inference(True)
    return mode.counts[F.linear], mode.counts[F.conv2d]


def test_inference_linears_run_as_onednn_convs():
    model = _model('twins_svt_small')
    x = torch.randn(1, 3, 64, 64)
    convs_only = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())  # patch embeds, PEGs, reductions
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.blocks.modules())
    assert (convs_only, n_linear) == (4 + 4 + 7, 9 * 4 + 9 * 5)  # SVT-S: 9 LSA and 9 GSA blocks
    assert _calls(model, x) == (0, convs_only + n_linear)  # every linear layer of every block, MLPs included
    assert _calls(model, x, grad=True) == (n_linear, convs_only)  # autograd: timm's F.linear
    assert _calls(model, x, exact=True) == (n_linear, convs_only)  # set_onednn_inference(False)


@pytest.mark.parametrize('shape,k,n', [((5, 7, 64), 64, 192), ((2, 300, 320), 320, 1280), ((1000, 1024), 1024, 256)])
@pytest.mark.parametrize('bias', [True, False])
def test_onednn_linear_equals_f_linear(shape, k, n, bias):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w, b = torch.randn(n, k) / k ** .5, (torch.randn(n) if bias else None)
    with torch.no_grad():
        out = linear(x, w, b)
        assert out.shape == (*shape[:-1], n) and out.is_contiguous()
        assert scaled_diff(out, F.linear(x, w, b)) <= FP32_TOL
        strided = x.transpose(0, -2) if x.ndim == 3 else x[::2]  # non-contiguous rows are gathered first
        assert scaled_diff(linear(strided, w, b), F.linear(strided, w, b)) <= FP32_TOL
        if k <= 192:  # short products: the same sums in the same order as MKL on this machine
            assert torch.equal(out, F.linear(x, w, b))


def test_onednn_linear_follows_autograd_and_bf16():
    w, b = torch.randn(64, 32), torch.randn(64)
    x = torch.randn(10, 32, requires_grad=True)
    linear(x, w, b).sum().backward()  # grad enabled: F.linear, differentiable
    assert torch.allclose(x.grad, w.sum(0).expand(10, 32))
    with torch.no_grad():
        xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
        out = linear(xb, wb, bb)
        assert out.dtype == torch.bfloat16
        assert scaled_diff(out.float(), F.linear(xb, wb, bb).float()) <= 1e-2


def test_onednn_linear_switch_from_environment():
    code = ('import torch, twins_timm.models.twins as t; x = torch.randn(4, 8); '
            'print(torch.no_grad()(t.use_onednn_inference)(x))')
    for value, expect in (('0', 'False'), ('1', 'True')):
        env = dict(__import__('os').environ, TWINS_TIMM_ONEDNN=value)
        res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.strip() == expect


def test_mlp_row_chunks_only_on_cpu():
    blk = Block(64, 1, mlp_ratio=8).eval()
    with torch.no_grad():
        assert blk._row_chunks(torch.empty(2, 16384, 64)) > 1
        assert blk._row_chunks(torch.empty(2, 16384, 64, device='meta')) == 1  # GPUs: one product
    assert blk._row_chunks(torch.empty(2, 16384, 64)) == 0  # autograd: the plain path


@pytest.mark.parametrize('heads,keys', [(1, 49), (5, 16), (8, 100)])
def test_token_attention_equals_sdpa(heads, keys, monkeypatch):
    monkeypatch.setattr(twins_mod, 'ATTN_CHUNK_ELEMENTS', 1)  # 64-row chunks: ragged last chunk
    torch.manual_seed(0)
    d, n = 64, 150
    q, k, v = torch.randn(2, n, heads * d), torch.randn(2, keys, heads, d), torch.randn(2, keys, heads, d)
    with torch.no_grad():
        got = twins_mod.token_attention(q, k, v, d ** -0.5)
        want = F.scaled_dot_product_attention(q.view(2, n, heads, d).transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2)).transpose(1, 2).reshape(2, n, heads * d)
    assert got.shape == want.shape and scaled_diff(got, want) <= FP32_TOL


def test_pcpvt_inference_attention_runs_as_convs():
    # PCPVT's 64-wide heads take token_attention in CPU inference; SVT's 32-wide ones keep torch's kernel
    calls = []
    original = twins_mod.token_attention
    _patch.setattr(twins_mod, 'token_attention', lambda *a: calls.append(1) or original(*a))
    for name, expect in (('twins_pcpvt_small', 16), ('twins_svt_small', 0)):
        calls.clear()
        with torch.no_grad():
            _model(name).forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
        assert len(calls) == expect, name

"""Every inference fast path ``twins_timm.optimize`` swaps into the backbone computes what the plain
(training / autograd) path computes.

The fast paths: linear layers and PCPVT's global attention through whichever kernel the model's kernel
table picked (``optimize(model, kernels='onednn')`` here, so the path is exercised), the MLP run over row
chunks through its own modules with the residual added in place (inference only), and SVT's window
attention over chunks of windows (else all windows' heads as one batch of matmuls). Chunk sizes are
shrunk here so that small inputs take several ragged chunks; the plain path is the same model with
autograd recording (F.linear, no chunking, no in-place). Differences are measured against the output's
scale (see numerics.py). Kernel choice is tested with an injected timer: tests time nothing.
"""

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from numerics import FP32_TOL, scaled_diff
from references import ONE_BLOCK_DEPTHS, seeded_model, timm_like_init_
from twins_timm.models.twins import Block, LocallyGroupedAttn, checkpoint_family_args, window_attn_mask
from twins_timm.optimize import calibration_report, kernel_choices, kernels, optimize
from twins_timm.optimize.kernels import KernelTable
from twins_timm.optimize.layers import FastBlock, Linear

SIZES = [(64, 64), (97, 131), (250, 333)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, 'MLP_CHUNK_ELEMENTS', 1)
    monkeypatch.setattr(kernels, 'MLP_CHUNK_MIN_ROWS', 32)
    monkeypatch.setattr(kernels, 'WINDOW_CHUNK_ELEMENTS', 3 * 2 * 49 * 49)  # 3 windows of 2 heads per chunk


def _model(name, family='timm', seed=0, kernels='onednn', **kwargs):
    """Seeded weights on timm's init scale, norms off their unit / zero defaults (references.py), optimized
    with ``kernels`` (None: the plain model)."""
    args = checkpoint_family_args(family, name) if family != 'timm' else {}
    model = seeded_model(name, seed, init=timm_like_init_, **args, **kwargs)
    return model if kernels is None else optimize(model, kernels=kernels)


def _count_fc1_calls(model, monkeypatch):
    """fc1 applications: one per block on the plain path, one per chunk on the chunked one.

    Counted without hooks (a hook on the MLP turns chunking off): the chunk decision is wrapped instead.
    """
    calls = []
    decide = FastBlock._mlp_row_chunks

    def counting(self, x):
        chunks = decide(self, x)
        calls.extend([1] * chunks if chunks > 1 else [])
        return chunks
    original = FastBlock.forward

    def forward(self, x, size):
        calls.append(0)  # one per block call; chunked calls add their chunks
        return original(self, x, size)
    monkeypatch.setattr(FastBlock, '_mlp_row_chunks', counting)
    monkeypatch.setattr(FastBlock, 'forward', forward)
    return calls


def _plain(model, x):
    with torch.enable_grad():
        out = model.forward_intermediates(x.requires_grad_(), intermediates_only=True)
    return [o.detach() for o in out]


@pytest.mark.parametrize('name,family', [('twins_pcpvt_small', 'timm'), ('twins_svt_small', 'timm'),
                                         ('twins_svt_small', 'official_seg'), ('twins_pcpvt_small', 'mmseg')])
@pytest.mark.parametrize('size', SIZES)
def test_chunked_inference_equals_plain_path(small_chunks, name, family, size, monkeypatch):
    model = _model(name, family)
    calls = _count_fc1_calls(model, monkeypatch)
    x = torch.randn(2, 3, *size)
    plain = _plain(model, x.clone())
    assert sum(calls) == 0  # autograd: no chunks
    with torch.inference_mode():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert sum(calls) > 0  # the inference run really went through row chunks
    assert [a.shape for a in fast] == [b.shape for b in plain]
    assert scaled_diff(fast, plain) <= FP32_TOL


def test_no_grad_also_takes_the_fast_path_and_leaves_input_alone(small_chunks, monkeypatch):
    model = _model('twins_svt_small')
    x = torch.randn(1, 3, 96, 96)
    x0 = x.clone()
    plain = _plain(model, x.clone())
    calls = _count_fc1_calls(model, monkeypatch)
    with torch.no_grad():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert sum(calls) > 0
    assert torch.equal(x, x0)
    assert scaled_diff(fast, plain) <= FP32_TOL


def test_training_mode_never_chunks(small_chunks, monkeypatch):
    model = _model('twins_pcpvt_small').train()
    calls = _count_fc1_calls(model, monkeypatch)
    with torch.no_grad():
        model.forward_intermediates(torch.randn(1, 3, 64, 64), intermediates_only=True)
    assert len(calls) == sum(model.depths) and sum(calls) == 0


def test_hooked_mlp_runs_whole_and_hooks_see_full_tensors(small_chunks, monkeypatch):
    model = _model('twins_svt_small', depths=[2, 2, 2, 2])
    calls = _count_fc1_calls(model, monkeypatch)
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        chunked = model.forward_intermediates(x, intermediates_only=True)
    assert sum(calls) > 0
    calls.clear()
    seen = []
    model.blocks[0][0].mlp.fc2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.inference_mode():
        whole = model.forward_intermediates(x, intermediates_only=True)
    assert seen == [torch.Size([1, 24 * 24, 64])]  # every token at once
    assert calls[0] == 0  # the hooked block did not chunk; the others still do
    assert scaled_diff(whole, chunked) <= FP32_TOL


def test_default_chunking_at_512_matches_plain_path(monkeypatch):
    # real chunk sizes: at 512x512 the first two stages' MLPs run in several chunks
    model = _model('twins_pcpvt_small')
    x = torch.randn(1, 3, 512, 512)
    calls = _count_fc1_calls(model, monkeypatch)
    with torch.inference_mode():
        fast = model.forward_intermediates(x, intermediates_only=True)
    assert sum(calls) > 0
    plain = _plain(model, x)
    assert scaled_diff(fast, plain) <= FP32_TOL


@pytest.mark.parametrize('size', [(70, 70), (75, 90), (100, 64)])
def test_masked_window_attention_equals_reference_math(size):
    # official-segmentation mask, only where a window is padded: check against a direct computation, for
    # the plain layer and the optimized one
    torch.manual_seed(0)
    attn = LocallyGroupedAttn(32, 2, ws=7, window_mask=True).eval()
    h, w = size[0] // 4, size[1] // 4
    x = torch.randn(2, h * w, 32)
    with torch.inference_mode():
        plain = attn(x, (h, w))
        out = optimize(attn, kernels='onednn')(x, (h, w))
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
    assert (out - ref).abs().max().item() <= 1e-5 and (plain - ref).abs().max().item() <= 1e-5


def _window_blocks(model):
    return sum(isinstance(m, LocallyGroupedAttn) for m in model.modules())


def _count_window_chunks(monkeypatch):
    calls = []
    original = kernels.chunked_window_attention
    monkeypatch.setattr(kernels, 'chunked_window_attention', lambda *a: calls.append(a[0].shape) or original(*a))
    return calls


@pytest.mark.parametrize('masked', [False, True])
def test_chunked_window_attention_equals_all_windows_at_once(masked, monkeypatch):
    monkeypatch.setattr(kernels, 'WINDOW_CHUNK_ELEMENTS', 4 * 2 * 49 * 49)  # ragged: 4 + 4 + 4 + 3 windows
    torch.manual_seed(0)
    layer = optimize(LocallyGroupedAttn(32, 2, ws=7).eval())
    qkv = torch.randn(15, 49, 3, 2, 16)
    mask = window_attn_mask(19, 30, 7, qkv.device, qkv.dtype)[:, None] if masked else None
    with torch.no_grad():
        want = layer._all_windows(qkv, mask)
        got = kernels.chunked_window_attention(qkv, layer.scale, mask)
    assert got.shape == want.shape == (15, 2, 49, 16) and got.is_contiguous()
    assert scaled_diff(got, want) <= FP32_TOL
    if masked:  # the mask really changed something
        assert scaled_diff(got, kernels.chunked_window_attention(qkv, layer.scale)) > 1e-3


@pytest.mark.parametrize('kernel,chunked', [(kernels.ONEDNN, True), (kernels.PLAIN, False)])
def test_svt_inference_window_attention_follows_the_choice(kernel, chunked, monkeypatch):
    model = _model('twins_svt_small', kernels=kernel)
    calls = _count_window_chunks(monkeypatch)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        model.forward_intermediates(x, intermediates_only=True)
    assert len(calls) == (_window_blocks(model) if chunked else 0)  # one per window-attention block
    calls.clear()
    with torch.enable_grad():  # autograd: all windows at once, as timm
        model.forward_intermediates(x, intermediates_only=True)
    model.train()
    with torch.no_grad():  # training mode (attention dropout): all windows at once
        model.forward_intermediates(x, intermediates_only=True)
    assert calls == []


def test_hooked_attention_dropout_sees_all_attention_weights(monkeypatch):
    # a hook on attn_drop is how attention maps are read out: it gets every window's weights at once
    model = _model('twins_svt_small')
    calls = _count_window_chunks(monkeypatch)
    layer = model.blocks[0][0].attn
    seen = []
    handle = layer.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        hooked = model.forward_intermediates(x, intermediates_only=True)
    handle.remove()
    assert seen == [torch.Size([16, 2, 49, 49])]  # 4 x 4 windows of stage 1, two heads, all at once
    blocks = _window_blocks(model)
    assert len(calls) == blocks - 1  # the other window-attention blocks still chunk
    with torch.inference_mode():
        free = model.forward_intermediates(x, intermediates_only=True)
    assert len(calls) == 2 * blocks - 1 and scaled_diff(hooked, free) <= FP32_TOL


def test_window_attention_chunks_are_a_measured_choice(monkeypatch):
    layer = LocallyGroupedAttn(64, 2, ws=7).eval()
    dropout_calls = []
    monkeypatch.setattr(layer.attn_drop, 'forward', lambda t: dropout_calls.append(t.shape) or t)
    measured = {}

    def timed(candidates, timer):
        if kernels.WINDOWS not in candidates:  # the linears: timm's kernel, nothing timed
            return {name: 1.0 for name in candidates}
        assert list(candidates) == [kernels.PLAIN, kernels.WINDOWS]
        measured.update({name: run() for name, run in candidates.items()})
        return {kernels.PLAIN: 1.0, kernels.WINDOWS: measured['speed']}
    monkeypatch.setattr(kernels, '_time_interleaved', timed)
    monkeypatch.setattr(kernels, 'WINDOW_CHUNK_ELEMENTS', 10 * 2 * 49 * 49)  # 10 windows of 2 heads per chunk
    x = torch.randn(1, 140 * 140, 64)  # 400 windows: more than the calibration's sample
    for speed, chunked in ((0.97, False), (0.5, True)):  # within the margin: all at once, as timm
        optimize(layer, kernels='auto')  # a new, empty table
        measured.clear()
        measured['speed'] = speed
        calls = _count_window_chunks(monkeypatch)
        with torch.no_grad():
            layer(x, (140, 140))
        assert (calls.count((400, 49, 3, 2, 32)) == 1) == chunked  # the layer's own call (not the sample's)
        (rec,) = [r for r in calibration_report(layer) if r['family'] == 'window attention']
        assert rec['choice'] == (kernels.WINDOWS if chunked else kernels.PLAIN) and rec['shape'][:2] == (512, 49)
        sample = measured[kernels.PLAIN].shape[0]  # the plain candidate is the layer's own path (its dropout)
        assert sample == 10 * kernels.WINDOW_CALIBRATION_CHUNKS and (sample, 2, 49, 49) in dropout_calls
        assert scaled_diff(measured[kernels.WINDOWS], measured[kernels.PLAIN]) <= FP32_TOL


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


def _calls(model, x, grad=False):
    with torch.set_grad_enabled(grad), _CountCalls() as mode:
        model.forward_intermediates(x, intermediates_only=True)
    return mode.counts[F.linear], mode.counts[F.conv2d]


def test_inference_linears_take_the_chosen_kernel():
    plain = _model('twins_svt_small', kernels=None)
    x = torch.randn(1, 3, 64, 64)
    convs_only = sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules())  # patch embeds, PEGs, reductions
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in plain.blocks.modules())
    assert (convs_only, n_linear) == (4 + 4 + 7, 9 * 4 + 9 * 5)  # SVT-S: 9 LSA and 9 GSA blocks
    assert all(type(m) is torch.nn.Linear for m in plain.modules() if isinstance(m, torch.nn.Linear))
    assert _calls(plain, x) == (n_linear, convs_only)  # the plain model: timm's F.linear
    model = optimize(plain, kernels='onednn')
    assert all(type(m) is Linear for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    gsa_blocks = 9  # one image: the global attention as two grouped 1x1 convs per GSA block
    assert _calls(model, x) == (0, convs_only + n_linear + 2 * gsa_blocks)  # oneDNN chosen everywhere
    assert _calls(model, x, grad=True) == (n_linear, convs_only)  # autograd: timm's F.linear
    assert _calls(optimize(model, kernels='plain'), x) == (n_linear, convs_only)  # plain chosen: timm's F.linear


def _traced(model, x, grad=False, kernel=kernels.ONEDNN, dynamic=False):
    """Compile ``model`` with a backend that keeps dynamo's graphs; the output and the functions called."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    compiled = torch.compile(optimize(model, kernels=kernel), backend=keep, fullgraph=True, dynamic=dynamic)
    with torch.set_grad_enabled(grad):
        out = compiled(x)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == 'call_function']
    return out, sum(t in (F.linear, torch._C._nn.linear) for t in targets), sum(t in (F.conv2d, torch.conv2d) for t in targets)


@pytest.mark.parametrize('name', ['twins_pcpvt_small', 'twins_svt_small'])
def test_compiled_inference_traces_the_chosen_linear_kernel(name):
    model = _model(name, **ONE_BLOCK_DEPTHS)
    x = torch.randn(1, 3, 64, 64)
    convs_only = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    n_linear = sum(isinstance(m, Linear) for m in model.blocks.modules())
    with torch.no_grad():
        eager = model(x)
    out, linears, convs = _traced(model, x)
    assert (linears, convs) == (0, convs_only + n_linear + 1)  # every linear a 1x1 conv, the head too
    assert scaled_diff(out, eager) <= FP32_TOL
    assert _traced(model, x, kernel=kernels.PLAIN)[1:] == (n_linear + 1, convs_only)
    out, linears, convs = _traced(model, x, grad=True)  # autograd: timm's F.linear
    assert (linears, convs) == (n_linear + 1, convs_only) and out.requires_grad
    torch._dynamo.reset()


@pytest.mark.slow  # a faster sibling covers the same code
def test_compiled_inference_with_free_sizes_keeps_the_kernel_choice():
    """Dynamic shapes: the choice takes no size, so symbolic sizes trace into one graph (fullgraph)."""
    model = _model('twins_svt_small', **ONE_BLOCK_DEPTHS)
    for size in ((64, 64), (97, 131)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            eager = model(x)
        out, linears, convs = _traced(model, x, dynamic=True)
        assert linears == 0 and scaled_diff(out, eager) <= FP32_TOL
    torch._dynamo.reset()


def test_export_keeps_f_linear():  # the optimized model exports as the plain one
    model = _model('twins_svt_small', **ONE_BLOCK_DEPTHS)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
    assert targets.count('aten.linear.default') == sum(isinstance(m, nn.Linear) for m in model.modules())


def test_compiled_choice_measures_what_inductor_runs(monkeypatch):
    """With inductor's freezing the oneDNN candidate is the prepacked 1x1 conv inductor runs; both
    candidates compute the layer's product. Without freezing the choice is the eager one."""
    from torch._inductor import config as inductor_config
    seen = {}

    def fake_timing(candidates, timer):
        seen.update(candidates)
        return {kernels.PLAIN: 1.0, kernels.ONEDNN: 0.5}
    monkeypatch.setattr(kernels, '_time_interleaved', fake_timing)
    layer = optimize(nn.Linear(64, 96), kernels='auto')
    with inductor_config.patch(freezing=True):
        assert kernels.compiled_linear_kernel(layer, torch.float32) == kernels.ONEDNN
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))
    with torch.no_grad():
        reference = seen[kernels.PLAIN]()
        with Record():
            packed = seen[kernels.ONEDNN]()
    assert ops == ['mkldnn._convolution_pointwise']
    assert scaled_diff(packed.permute(0, 2, 3, 1).reshape(reference.shape), reference) <= FP32_TOL
    with inductor_config.patch(freezing=False):
        assert kernels.compiled_linear_kernel(layer, torch.float32) == kernels.ONEDNN
    families = sorted(r['family'] for r in calibration_report(layer))
    assert families == ['compiled linear', 'linear']
    largest = 2 ** int(math.log2(kernels.CALIBRATION_FLOPS / (2 * 64 * 96)))  # rows bucket within the work cap
    assert all(r['shape'][0] == largest for r in calibration_report(layer))


@pytest.mark.parametrize('shape,k,n', [((5, 7, 64), 64, 192), ((2, 300, 320), 320, 1280), ((1000, 1024), 1024, 256)])
@pytest.mark.parametrize('bias', [True, False])
def test_onednn_linear_equals_f_linear(shape, k, n, bias):
    torch.manual_seed(0)
    x = torch.randn(shape)
    w, b = torch.randn(n, k) / k ** .5, (torch.randn(n) if bias else None)
    with torch.no_grad():
        out = kernels.onednn_linear(x, w, b)
        assert out.shape == (*shape[:-1], n) and out.is_contiguous()
        assert scaled_diff(out, F.linear(x, w, b)) <= FP32_TOL
        strided = x.transpose(0, -2) if x.ndim == 3 else x[::2]  # non-contiguous rows are gathered first
        assert scaled_diff(kernels.onednn_linear(strided, w, b), F.linear(strided, w, b)) <= FP32_TOL


def test_linear_module_follows_autograd_and_bf16():
    torch.manual_seed(0)
    layer = optimize(nn.Linear(32, 64), kernels='onednn')
    x = torch.randn(10, 32, requires_grad=True)
    layer(x).sum().backward()  # grad enabled: F.linear, differentiable
    assert torch.allclose(x.grad, layer.weight.sum(0).expand(10, 32), atol=1e-6)
    assert layer.weight.grad is not None
    with torch.no_grad():
        xb = x.bfloat16()
        out = layer.bfloat16()(xb)
        assert out.dtype == torch.bfloat16
        assert scaled_diff(out.float(), F.linear(xb, layer.weight, layer.bias).float()) <= 1e-2


def test_saved_kernel_table_replays_the_choices_without_timing(monkeypatch, tmp_path):
    # 'auto' measures (here: a fake timer on which oneDNN and the chunks win every other shape); the
    # choices it saved, given back as a dict or a JSON file, give the same kernels and the same numbers
    # with nothing timed, also in another model instance
    timed = []

    def fake_timing(candidates, timer):
        timed.append(list(candidates))
        alternative = list(candidates)[1]
        return {kernels.PLAIN: 1.0, alternative: 0.5 if len(timed) % 2 else 2.0}
    monkeypatch.setattr(kernels, '_time_interleaved', fake_timing)
    x = torch.randn(1, 3, 97, 131)
    measured = _model('twins_svt_small', kernels='auto', **ONE_BLOCK_DEPTHS)
    with torch.no_grad():
        first = measured(x)
    choices = kernel_choices(measured)
    assert timed and len(choices) == len(timed) and set(choices.values()) > {kernels.PLAIN}
    path = tmp_path / 'kernels.json'
    path.write_text(json.dumps(choices))
    timed.clear()
    for saved in (choices, str(path)):
        replay = _model('twins_svt_small', kernels=saved, **ONE_BLOCK_DEPTHS)
        with torch.no_grad():
            assert torch.equal(replay(x), first)
        assert timed == [] and kernel_choices(replay) == choices
    for bad in ('fastest', str(tmp_path / 'missing.json'), {'linear:1': 'gpu'}):
        with pytest.raises(ValueError, match='kernel'):
            KernelTable.from_spec(bad)


def test_plain_model_never_takes_a_fast_path(monkeypatch):
    # no global switch: the plain model has no optimize layers, so nothing is timed or chosen
    monkeypatch.setattr(kernels, '_time_interleaved', lambda *a: pytest.fail('the plain model timed a kernel'))
    model = _model('twins_svt_small', kernels=None, **ONE_BLOCK_DEPTHS)
    assert not any(hasattr(m, 'kernel_table') for m in model.modules())
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert kernel_choices(model) == {}


def test_nothing_cpu_specific_off_the_cpu():
    with torch.no_grad():
        assert kernels.fast_inference(torch.empty(4, 8))
        assert not kernels.fast_inference(torch.empty(4, 8, device='meta'))  # GPUs: timm's kernels
        assert not kernels.fast_inference(torch.empty(4, 8, dtype=torch.float64))
    assert not kernels.fast_inference(torch.empty(4, 8))  # autograd


class _CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_window_attention_takes_torch_fused_attention_except_optimized_on_the_cpu():
    # timm's call everywhere; off the CPU (meta stands in for CUDA) also in an optimized model
    attn = optimize(LocallyGroupedAttn(32, 2, ws=7, window_mask=True, device='meta').eval())
    with torch.no_grad(), _CountSDPA() as mode:
        out = attn(torch.empty(2, 10 * 12, 32, device='meta'), (10, 12))
    assert mode.calls == 1 and out.shape == (2, 120, 32)
    cpu = LocallyGroupedAttn(32, 2, ws=7).eval()
    with torch.no_grad(), _CountSDPA() as mode:
        cpu(torch.randn(2, 10 * 12, 32), (10, 12))
    assert mode.calls == 1  # the plain layer: timm's SDPA call
    with torch.no_grad(), _CountSDPA() as mode:
        optimize(cpu, kernels='plain')(torch.randn(2, 10 * 12, 32), (10, 12))
    assert mode.calls == 0  # optimized on the CPU: 49-token windows as batched matmuls


@pytest.mark.parametrize('heads,keys', [(1, 49), (5, 16), (8, 100)])
def test_onednn_attention_equals_sdpa(heads, keys, monkeypatch):
    monkeypatch.setattr(kernels, 'ATTN_CHUNK_ELEMENTS', 1)  # 64-row chunks: ragged last chunk
    torch.manual_seed(0)
    d, n = 64, 150
    q, k, v = torch.randn(2, n, heads * d), torch.randn(2, keys, heads, d), torch.randn(2, keys, heads, d)
    with torch.no_grad():
        got = kernels.onednn_attention(q, k, v, d ** -0.5)
        want = kernels.sdpa_attention(q, k, v, d ** -0.5)
        ref = F.scaled_dot_product_attention(q.view(2, n, heads, d).transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2)).transpose(1, 2).reshape(2, n, heads * d)
    assert torch.equal(want, ref)
    assert got.shape == want.shape and scaled_diff(got, want) <= FP32_TOL


@pytest.mark.parametrize('kernel,expect', [(kernels.ONEDNN, 16), (kernels.PLAIN, 0)])
def test_pcpvt_inference_attention_follows_the_choice(kernel, expect, monkeypatch):
    calls = []
    original = kernels.onednn_attention
    monkeypatch.setattr(kernels, 'onednn_attention', lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        _model('twins_pcpvt_small', kernels=kernel).forward_intermediates(torch.randn(1, 3, 64, 64),
                                                                          intermediates_only=True)
    assert len(calls) == expect


# ------------------------------------------------------------------- choosing by measurement
class FakeTimer:
    """perf_counter stand-in: each timed call of a candidate 'takes' the seconds given for it."""

    def __init__(self):
        self.now, self.running = 0.0, None

    def __call__(self):
        return self.now


def _fake_candidates(timer, seconds, calls):
    def make(name):
        def run():
            calls.append(name)
            timer.now += seconds[name]
        return run
    return {name: make(name) for name in seconds}


@pytest.mark.parametrize('plain_s,onednn_s,expect', [
    (1.0, 0.5, kernels.ONEDNN),   # clearly faster: taken
    (1.0, 0.97, kernels.PLAIN),   # within the margin: timm's kernel stays
    (1.0, 2.0, kernels.PLAIN),    # slower: never taken
])
def test_choice_by_measurement(plain_s, onednn_s, expect):
    timer, calls = FakeTimer(), []
    table = KernelTable('auto', timer=timer)
    cands = _fake_candidates(timer, {kernels.PLAIN: plain_s, kernels.ONEDNN: onednn_s}, calls)
    assert table.choose('test', ('shape', plain_s, onednn_s), 1e9, cands) == expect
    n = len(calls)
    assert n == 2 * (1 + kernels.CALIBRATION_ROUNDS)  # warm-up + interleaved rounds
    assert table.choose('test', ('shape', plain_s, onednn_s), 1e9, cands) == expect
    assert len(calls) == n  # cached per table and shape: measured once
    (rec,) = table.report()
    assert rec['choice'] == expect and rec['gflops'][kernels.PLAIN] == pytest.approx(1.0 / plain_s)
    assert table.choices == {'test:shape,%s,%s' % (plain_s, onednn_s): expect}


def test_calibration_keeps_the_fastest_round_and_interleaves():
    timer, calls = FakeTimer(), []
    slow_once = {'n': 0}

    def plain():
        calls.append('p')
        slow_once['n'] += 1
        timer.now += 5.0 if slow_once['n'] == 2 else 1.0  # one disturbed run (another process)

    def onednn():
        calls.append('o')
        timer.now += 1.5
    table = KernelTable('auto', timer=timer)
    choice = table.choose('test', ('noisy',), 1.0, {kernels.PLAIN: plain, kernels.ONEDNN: onednn})
    assert choice == kernels.PLAIN  # its best round counts, not the disturbed one
    assert calls == ['p', 'o'] * (1 + kernels.CALIBRATION_ROUNDS)


def test_real_calibration_picks_a_kernel_and_records_rates():
    # no timing asserted: whichever wins, the choice is one of the two and the rates are recorded
    layer = optimize(nn.Linear(64, 96))
    x = torch.randn(300, 64)
    with torch.no_grad():
        out = layer(x)
    assert scaled_diff(out, F.linear(x, layer.weight, layer.bias)) <= FP32_TOL
    (rec,) = calibration_report(layer)
    assert rec['family'] == 'linear' and rec['choice'] in (kernels.PLAIN, kernels.ONEDNN)
    assert rec['shape'][:3] == (512, 64, 96) and all(v > 0 for v in rec['gflops'].values())


def test_mlp_row_chunks_only_in_cpu_inference():
    blk = optimize(Block(64, 1, mlp_ratio=8, ws=1).eval(), kernels='onednn')
    with torch.no_grad():
        assert blk._mlp_row_chunks(torch.empty(2, 16384, 64)) > 1
        assert blk._mlp_row_chunks(torch.empty(2, 16384, 64, device='meta')) == 1  # GPUs: one product
    assert blk._mlp_row_chunks(torch.empty(2, 16384, 64)) == 1  # autograd: the plain path
    with torch.no_grad():
        assert blk.train()._mlp_row_chunks(torch.empty(2, 16384, 64)) == 1  # training (drop path): whole


@pytest.mark.parametrize('plain_s,rows_s,chunked', [
    (1.0, 0.5, True),     # the row chunks measured clearly faster: taken
    (1.0, 0.97, False),   # within the margin: the whole tensor, as timm
    (0.5, 1.0, False),    # slower: never taken
])
def test_mlp_row_chunks_are_a_measured_choice(monkeypatch, plain_s, rows_s, chunked):
    blk = optimize(Block(64, 1, mlp_ratio=8, ws=1).eval())
    norm_calls = []
    norm_forward = blk.norm2.forward
    monkeypatch.setattr(blk.norm2, 'forward', lambda t: norm_calls.append(t.shape[0]) or norm_forward(t))

    def timed(candidates, timer):
        if kernels.ROWS not in candidates:  # the linears inside the MLP: timm's kernel, nothing timed
            return {name: 1.0 for name in candidates}
        assert list(candidates) == [kernels.PLAIN, kernels.ROWS]
        for run in candidates.values():  # both candidates run the block's own modules
            run()
        return {kernels.PLAIN: plain_s, kernels.ROWS: rows_s}
    monkeypatch.setattr(kernels, '_time_interleaved', timed)
    with torch.no_grad():
        assert (blk._mlp_row_chunks(torch.empty(2, 16384, 64)) > 1) == chunked
        assert blk._mlp_row_chunks(torch.empty(2, 16384, 64)) > 1 if chunked else True  # cached: no second run
    sample_rows = norm_calls[0]
    assert len(norm_calls) == 1 + kernels.MLP_CALIBRATION_CHUNKS and sum(norm_calls[1:]) == sample_rows
    (rec,) = [r for r in calibration_report(blk) if r['family'] == 'mlp']
    assert rec['choice'] == (kernels.ROWS if chunked else kernels.PLAIN)
    optimize(blk, kernels='plain')
    with torch.no_grad():  # timm's calls everywhere: no chunks
        assert blk._mlp_row_chunks(torch.empty(2, 16384, 64)) == 1

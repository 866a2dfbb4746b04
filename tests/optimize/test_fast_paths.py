"""The inference fast path ``twins_timm.optimize`` swaps into the backbone computes what the plain
(training / autograd) path computes.

The fast path: the MLP run over row chunks through its own modules, each added in place into the fresh
attention sum, with its GELU in place (inference only), where the model's kernel table picked the row
chunks (``optimize(model, kernels='rows')`` here, so the path is exercised). Chunk sizes are shrunk here
so that small inputs take several ragged chunks; the plain path is the same model with autograd
recording (no chunking, no in-place). Differences are measured against the output's scale (see
numerics.py). Kernel choice is tested with an injected timer: tests time nothing.
"""

import json

import pytest
import torch
import torch.nn as nn

from numerics import FP32_TOL, scaled_diff
from references import ONE_BLOCK_DEPTHS, seeded_model, timm_like_init_
from twins_timm.models.twins import Block, checkpoint_family_args
from twins_timm.optimize import calibration_report, kernel_choices, kernels, optimize
from twins_timm.optimize.kernels import KernelTable
from twins_timm.optimize.layers import FastBlock, InplaceGELU

SIZES = [(64, 64), (97, 131), (250, 333)]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, 'MLP_CHUNK_ELEMENTS', 1)
    monkeypatch.setattr(kernels, 'MLP_CHUNK_MIN_ROWS', 32)


def _model(name, family='timm', seed=0, kernels='rows', **kwargs):
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


def test_export_keeps_f_linear():  # the optimized model exports as the plain one
    model = _model('twins_svt_small', **ONE_BLOCK_DEPTHS)
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(1, 3, 64, 64),))
    targets = [str(n.target) for n in program.graph.nodes if n.op == 'call_function']
    assert targets.count('aten.linear.default') == sum(isinstance(m, nn.Linear) for m in model.modules())


def test_saved_kernel_table_replays_the_choices_without_timing(small_chunks, monkeypatch, tmp_path):
    # 'auto' measures (here: a fake timer on which the row chunks win every other shape); the
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
    for bad in ('fastest', str(tmp_path / 'missing.json'), {'mlp:1': 'gpu'}):
        with pytest.raises(ValueError, match='kernel'):
            KernelTable.from_spec(bad)


@pytest.mark.parametrize('spec', ['onednn', {'linear:512,64,96,True,float32': 'onednn'}, {'conv3x3:1': 'winograd'}])
def test_kernels_of_earlier_versions_are_named_as_removed(spec):
    # a policy or a saved table of an earlier version: refused, with the values that remain and why
    with pytest.raises(ValueError, match=r"one of \(.*'rows'\).*measured and removed"):
        KernelTable.from_spec(spec)


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


@pytest.mark.parametrize('plain_s,rows_s,expect', [
    (1.0, 0.5, kernels.ROWS),     # clearly faster: taken
    (1.0, 0.97, kernels.PLAIN),   # within the margin: timm's kernel stays
    (1.0, 2.0, kernels.PLAIN),    # slower: never taken
])
def test_choice_by_measurement(plain_s, rows_s, expect):
    timer, calls = FakeTimer(), []
    table = KernelTable('auto', timer=timer)
    cands = _fake_candidates(timer, {kernels.PLAIN: plain_s, kernels.ROWS: rows_s}, calls)
    assert table.choose('test', ('shape', plain_s, rows_s), 1e9, cands) == expect
    n = len(calls)
    assert n == 2 * (1 + kernels.CALIBRATION_ROUNDS)  # warm-up + interleaved rounds
    assert table.choose('test', ('shape', plain_s, rows_s), 1e9, cands) == expect
    assert len(calls) == n  # cached per table and shape: measured once
    (rec,) = table.report()
    assert rec['choice'] == expect and rec['gflops'][kernels.PLAIN] == pytest.approx(1.0 / plain_s)
    assert table.choices == {'test:shape,%s,%s' % (plain_s, rows_s): expect}


def test_calibration_keeps_the_fastest_round_and_interleaves():
    timer, calls = FakeTimer(), []
    slow_once = {'n': 0}

    def plain():
        calls.append('p')
        slow_once['n'] += 1
        timer.now += 5.0 if slow_once['n'] == 2 else 1.0  # one disturbed run (another process)

    def rows():
        calls.append('r')
        timer.now += 1.5
    table = KernelTable('auto', timer=timer)
    choice = table.choose('test', ('noisy',), 1.0, {kernels.PLAIN: plain, kernels.ROWS: rows})
    assert choice == kernels.PLAIN  # its best round counts, not the disturbed one
    assert calls == ['p', 'r'] * (1 + kernels.CALIBRATION_ROUNDS)


def test_real_calibration_picks_a_kernel_and_records_rates(small_chunks):
    # no timing asserted: whichever wins, the choice is one of the two and the rates are recorded
    blk = optimize(Block(32, 1, mlp_ratio=4, ws=1).eval())
    x = torch.randn(1, 300, 32)
    with torch.no_grad():
        out = blk(x, (15, 20))
    with torch.enable_grad():
        want = blk(x.clone().requires_grad_(), (15, 20)).detach()
    assert scaled_diff(out, want) <= FP32_TOL
    (rec,) = calibration_report(blk)
    assert rec['family'] == 'mlp' and rec['choice'] in (kernels.PLAIN, kernels.ROWS)
    assert rec['shape'] == (512, 32, 128, 'float32') and all(v > 0 for v in rec['gflops'].values())


def test_mlp_gelu_works_in_place_only_without_autograd():
    blk = optimize(Block(32, 1, mlp_ratio=4, ws=1).eval(), kernels='plain')
    act = blk.mlp.act
    assert type(act) is InplaceGELU and isinstance(act, nn.GELU)
    x = torch.randn(4, 8)
    want = nn.functional.gelu(x)
    with torch.no_grad():
        out = act(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(out, want)  # overwrote its (fresh) input
    y = torch.randn(4, 8, requires_grad=True)
    out = act(y)
    assert out.data_ptr() != y.data_ptr() and out.requires_grad  # autograd: timm's F.gelu


def test_mlp_row_chunks_only_in_cpu_inference():
    blk = optimize(Block(64, 1, mlp_ratio=8, ws=1).eval(), kernels='rows')
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

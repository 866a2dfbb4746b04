"""`twins-timm bench`: runs end to end on a tiny configuration and writes a complete JSON.

No timed assertions: speeds are only checked to be positive numbers; the numerics it reports
(ours vs timm's Twins, ours vs mmseg) are checked to agree.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from twins_timm.cli import main
from twins_timm.commands import bench as bench_command
from twins_timm.devtools import bench, bench_models, bench_render, bench_timing

pytestmark = pytest.mark.slow  # the whole file: the bench runs real models

# --threads 1: a test worker has one core (conftest.py); two OpenMP threads on it spin-wait on each other
# (the memory section's forward + backward ran ~20x slower). Also shows --threads is honoured: the default
# is every core.
TINY = ['bench', '--variants', 'twins_svt_small', '--sizes', '1x64x64', '--repeats', '1', '--warmup', '0',
        '--threads', '1', '--no-compile', '--heads', 'fpn', '--segmenter-size', '1x64x64',
        '--memory-size', '1x64x64', '--matmul-size', '256', '--quiet']
HAS_MMSEG = all(importlib.util.find_spec(m) for m in ('mmseg', 'mmcv', 'mmengine'))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """One tiny run covering every section (segmenters only where mmseg is installed).

    The tests read only what it reports, never how fast anything was."""
    out = tmp_path_factory.mktemp('bench') / 'bench.json'
    import io
    from contextlib import redirect_stdout

    import torch

    buf = io.StringIO()
    threads = torch.get_num_threads()  # the bench sets its --threads for the process
    try:
        with redirect_stdout(buf):
            rc = main(TINY + ['--json', str(out)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    return json.loads(out.read_text()), buf.getvalue()


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and v > 0


def test_json_has_machine_settings_methods(tiny_run):
    data, _ = tiny_run
    for key in ('date', 'machine', 'settings', 'methods', 'matmul', 'compile', 'backbones', 'segmenters', 'memory'):
        assert key in data
    assert 'targets' not in data  # measurements only
    assert 'kernels' not in data and 'kernels' not in data['settings']  # no kernel table left to report
    m = data['machine']
    assert m['threads'] == 1 and m['torch'] and m['cpu'] and m['device'] == 'cpu'
    assert data['settings']['sizes'] == ['1x64x64']
    for key in ('timing', 'flops', 'matmul_rate', 'memory_cpu', 'segmenters'):
        assert isinstance(data['methods'][key], str) and data['methods'][key]
    mm = data['matmul']['fp32']
    assert mm['n'] == 256 and mm['flops'] == 2 * 256 ** 3 and _positive(mm['gflops'])
    assert _positive(mm['onednn_gflops'])  # the kernel of our inference linear, timed on the same product
    assert data['compile']['available'] is False and 'skipped' in data['compile']['reason']
    assert data['engines']['results'] == [] and 'skipped' in data['engines']['reason']  # only with --engines


def test_backbone_row_ratios_and_parity(tiny_run):
    data, _ = tiny_run
    rows = data['backbones']
    assert [(r['variant'], r['mode'], r['precision']) for r in rows] == [('twins_svt_small', 'eager', 'fp32')]
    row = rows[0]
    assert (row['batch'], row['height'], row['width']) == (1, 64, 64)
    assert _positive(row['flops']) and _positive(row['ratio'])
    for side in ('ours', 'timm', 'exact'):
        for key in ('seconds', 'images_per_s', 'gflops', 'pct_matmul', 'pct_gemm'):
            assert _positive(row[side][key]), (side, key)
        assert len(row[side]['all_seconds']) == 1
    # same weights, same input: the two implementations agree; our plain model ('exact') bit for bit
    assert row['scaled_diff'] <= 1e-5 and row['max_abs_diff'] < 1e-3
    assert row['exact']['scaled_diff'] == row['exact']['max_abs_diff'] == 0


def test_backbone_row_speed_ceiling(tiny_run):
    data, text = tiny_run
    row = data['backbones'][0]
    ceiling = row['ceiling']
    # every product of our forward, once: the same FLOPs as the plain-path count
    assert ceiling['flops'] == row['flops'] and ceiling['calls'] == sum(op['calls'] for op in ceiling['ops'])
    assert _positive(ceiling['seconds']) and _positive(ceiling['pct_gemm']) and _positive(ceiling['ratio'])
    assert 0 <= ceiling['outside_share'] < 1
    assert all(set(op) == {'op', 'kind', 'shapes', 'calls', 'seconds_per_call', 'gflops'} for op in ceiling['ops'])
    assert {op['op'] for op in ceiling['ops'] if op['kind'] == 'other'} == {'layer_norm'}  # softmax: inside SDPA
    assert 'ceiling %gemm' in text and bench.METHODS['ceiling'] == data['methods']['ceiling']


def test_bf16_rows_as_a_gpu_adds_them(tmp_path, monkeypatch):
    # on CUDA every section gets bf16-autocast rows; here they run under the CPU's autocast, so the code
    # that makes them is exercised without a GPU (the CUDA calls themselves are not)
    import io
    from contextlib import redirect_stdout

    import torch

    resolve = bench_command.resolve_settings
    monkeypatch.setattr(bench_command, 'resolve_settings',
                        lambda args: {**resolve(args), 'precisions': ['fp32', 'bf16']})
    out, buf, threads = tmp_path / 'bench.json', io.StringIO(), torch.get_num_threads()
    try:
        with redirect_stdout(buf):
            assert main(TINY + ['--no-segmenters', '--no-memory', '--json', str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert set(data['matmul']) == {'fp32', 'bf16'} and _positive(data['matmul']['bf16']['gflops'])
    rows = data['backbones']
    assert [(r['precision'], r['mode']) for r in rows] == [('fp32', 'eager'), ('bf16', 'eager')]
    bf16 = rows[1]
    assert _positive(bf16['ratio']) and _positive(bf16['ours']['gflops'])
    assert bf16['scaled_diff'] <= 5e-2  # ours and timm's both under bf16 autocast
    assert any(line.split()[2:4] == ['bf16', 'eager'] for line in buf.getvalue().splitlines()
               if line.startswith('twins_svt_small'))


def test_memory_with_and_without_checkpointing(tiny_run):
    data, _ = tiny_run
    mem = data['memory']
    assert mem['method'] == bench.METHODS['memory_cpu']
    (row,) = mem['results']
    for key in ('without_checkpointing', 'with_checkpointing'):
        assert 'error' not in row[key], row[key]
        assert _positive(row[key]['peak_bytes'])  # at least the parameter gradients
    assert _positive(row['ratio'])


def test_segmenters_section(tiny_run):
    data, _ = tiny_run
    seg = data['segmenters']
    if not HAS_MMSEG:
        assert seg['available'] is False and 'not installed' in seg['reason'] and seg['results'] == []
        return
    (row,) = seg['results']
    assert (row['variant'], row['head']) == ('twins_svt_small', 'fpn')
    assert _positive(row['ratio']) and _positive(row['ours']['images_per_s'])
    assert _positive(row['mmseg']['images_per_s'])
    assert row['max_abs_diff'] < 1e-3  # converted weights: same logits as mmseg
    assert _positive(row['ceiling']['seconds']) and row['ceiling']['ops']
    assert row['ceiling']['ratio'] == pytest.approx(row['mmseg']['seconds'] / row['ceiling']['seconds'])


def test_table_printed(tiny_run):
    _, text = tiny_run
    assert "Backbones, ours vs timm's Twins" in text
    header = next(line for line in text.splitlines() if line.startswith('variant') and 'timm img/s' in line)
    row = next(line for line in text.splitlines() if line.startswith('twins_svt_small') and 'eager' in line)
    end = header.index('ratio') + len('ratio')  # numbers are right-aligned under their header
    assert row[end - 1].isdigit() and row[end:end + 1] in (' ', '')
    assert 'Peak training memory' in text and 'matmul rate (fp32, 256 x 256)' in text


def test_markdown_report_of_a_real_run(tiny_run, tmp_path, capsys):
    """docs/benchmarks.md's generator reads what the bench writes: every section, headed by CPU and date."""
    from twins_timm.devtools.bench_report import main as report
    data, _ = tiny_run
    path = tmp_path / 'run.json'
    path.write_text(json.dumps(data))
    assert report([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith('## %s, %s\n' % (data['machine']['cpu'], data['date']))
    assert '| twins_svt_small | 1x64x64 | fp32 | eager |' in out 
    assert 'Peak training memory' in out and ('Segmenters end to end' in out) == HAS_MMSEG


def test_compile_unavailable_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, 'compile_unavailable_reason', lambda device, backend: 'no C++ compiler found (g++)')
    settings = bench_command.resolve_settings(bench_args(tmp_path, ['--compile', '--no-segmenters', '--no-memory']))
    b = bench.Bench(settings)
    out = b.run()
    assert out['compile'] == {'available': False, 'reason': 'no C++ compiler found (g++)', 'backend': 'inductor'}
    compiled = [r for r in out['backbones'] if r['mode'] == 'compiled']
    assert compiled and compiled[0]['error'] == 'compile unavailable: no C++ compiler found (g++)'
    assert 'compile unavailable' in bench_render.render(out)


def test_no_backbones_skips_the_backbone_section(tmp_path):
    out = bench.Bench(bench_command.resolve_settings(bench_args(tmp_path, ['--no-backbones', '--no-segmenters',
                                                                    '--no-memory']))).run()
    assert out['backbones'] == [] and 'targets' not in out
    assert "Backbones, ours vs timm's Twins" not in bench_render.render(out)


def test_no_mmseg_skips_only_the_comparison_with_mmseg(tmp_path, monkeypatch):
    settings = bench_command.resolve_settings(bench_args(tmp_path, ['--no-backbones', '--no-mmseg', '--no-memory']))
    assert settings['segmenters'] and not settings['mmseg']
    monkeypatch.setattr(bench, 'build_mmseg_segmenter', lambda *a, **k: pytest.fail('mmseg was built'), raising=False)
    out = bench.Bench(settings).run()
    assert out['segmenters'] == {'available': False, 'reason': 'skipped (--no-mmseg)', 'results': []}


def bench_args(tmp_path: Path, extra):
    import argparse
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    return parser.parse_args(['--variants', 'twins_pcpvt_small', '--sizes', '1x32x32', '--repeats', '1',
                              '--warmup', '0', '--matmul-size', '256', '--threads', '1', '--quiet',
                              '--json', str(tmp_path / 'b.json')] + list(extra))


def test_refuses_existing_json_and_bad_arguments(tmp_path, capsys):
    existing = tmp_path / 'old.json'
    existing.write_text('keep')
    assert main(['bench', '--no-compile', '--json', str(existing)]) == 2
    assert existing.read_text() == 'keep'
    assert '--force' in capsys.readouterr().err
    assert main(['bench', '--sizes', '2x512', '--json', str(tmp_path / 'a.json')]) == 2
    assert 'BATCHxHEIGHTxWIDTH' in capsys.readouterr().err
    assert main(['bench', '--variants', 'twins_vit_small', '--json', str(tmp_path / 'a.json')]) == 2
    assert 'unknown variant' in capsys.readouterr().err
    assert not (tmp_path / 'a.json').exists()


def test_quick_defaults(tmp_path):
    s = bench_command.resolve_settings(bench_args(tmp_path, []))
    assert s['compile'] is True and s['repeats'] == 1
    import argparse
    parser = argparse.ArgumentParser()
    bench_command.add_arguments(parser)
    q = bench_command.resolve_settings(parser.parse_args(['--quick', '--json', str(tmp_path / 'q.json')]))
    assert q['variants'] == list(bench_command.QUICK_VARIANTS) and q['sizes'] == [(2, 512, 512)]
    assert q['compile'] is False and q['memory_variants'] == ['twins_pcpvt_small']


def test_table_helper_and_no_to_do_list(tiny_run):
    _, text = tiny_run
    assert 'Target' not in text and 'issue' not in text  # the bench prints measurements, not our to-do list
    table = bench_render.format_table(['name', 'value'], [['a', 1.5], ['longer', 10.25], ['none', None]]).splitlines()
    assert table == ['name    value', '------  -----', 'a        1.50', 'longer  10.25', 'none        -']


def test_flop_count_includes_cpu_attention():
    # torch's counter has no formula for the CPU flash kernel; without ours attention would count 0
    import torch
    q, k = torch.randn(2, 3, 64, 16), torch.randn(2, 3, 32, 16)
    flops = bench_timing.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, k))
    assert flops == 2 * (2 * 2 * 3 * 64 * 32 * 16)  # q @ k^T and attn @ v, 2 FLOPs per multiply-add


def test_flop_count_is_the_plain_models_work():
    # the bench counts FLOPs on our plain model (timm's work) and times the optimized copy
    import torch
    from twins_timm.optimize.layers import InplaceGELU
    ours, plain, ref = bench_models.build_backbone_pair('twins_svt_small', 'cpu', 0)
    assert not any(isinstance(m, InplaceGELU) for m in plain.modules())
    assert any(isinstance(m, InplaceGELU) for m in ours.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        flops = bench_timing.count_flops(lambda: plain(x))
        assert flops == bench_timing.count_flops(lambda: ref(x)) > 0
        assert all(torch.equal(a, b) for a, b in zip(plain(x), ref(x)))


def test_mmseg_import_leaves_transformers_importable(monkeypatch):
    """import_mmseg hides transformers from mmengine's optimizer registration (~1 s), then un-hides it."""
    from mmseg_reference import require_mmseg
    from twins_timm.devtools.mmseg_reference import import_mmseg
    require_mmseg()
    monkeypatch.delitem(sys.modules, 'transformers', raising=False)
    import_mmseg()
    assert 'transformers' not in sys.modules  # not left as None, which would make `import transformers` fail
    monkeypatch.setitem(sys.modules, 'transformers', loaded := object())
    import_mmseg()
    assert sys.modules['transformers'] is loaded  # something had loaded it: left alone


def test_engines_side_by_side_with_parity(tmp_path, monkeypatch):
    """--engines: every engine x dtype on a shallow PCPVT backbone and FPN (timm's options: fast to export),
    each row with its parity against torch fp32, export and first-call times apart; unavailable ones say why."""
    import functools
    for mod in ('onnx', 'onnxscript', 'onnxruntime', 'openvino'):
        pytest.importorskip(mod)
    from twins_timm.devtools import engine_bench as deploy_bench
    monkeypatch.setattr(bench, 'build_engine_model', functools.partial(
        bench.build_engine_model, depths=[1, 1, 1, 1], patch_padding='none'))
    monkeypatch.setattr(deploy_bench, 'native_bf16', lambda: (False, 'no bf16 flags (test)'))
    settings = bench_command.resolve_settings(bench_args(tmp_path, ['--engines', '--heads', 'fpn', '--segmenter-size',
                                                            '1x64x64', '--no-compile', '--no-memory']))
    section = bench.Bench(settings).engines()
    rows = section['results']
    assert section['method'] == deploy_bench.METHOD
    assert [(r['model'], r['engine'], r['dtype']) for r in rows] == [
        (model, engine, dtype) for model in ('twins_pcpvt_small', 'fpn twins_pcpvt_small')
        for engine, dtype in deploy_bench.ENGINE_DTYPES]
    for r in rows:
        if r['dtype'] == 'bf16':
            assert 'bf16' in r['skipped'] and 'seconds' not in r  # refused with the reason, not measured
            continue
        assert 'error' not in r, r
        assert _positive(r['seconds']) and _positive(r['images_per_s']) and _positive(r['speedup'])
        assert r['first_call_seconds'] > 0 and r['scaled_diff'] < 1e-3
        if r['engine'] == 'torch':
            assert r['scaled_diff'] == 0 and 'export_seconds' not in r
        elif r['engine'] == deploy_bench.OPTIMIZED:  # our CPU-inference layers: within rounding of the plain model
            assert r['scaled_diff'] < 1e-5 and 'export_seconds' not in r
        else:
            assert _positive(r['export_seconds'])
        if r['engine'] == 'openvino':
            assert _positive(r['convert_seconds'])
        if r['head']:
            assert r['argmax_agreement'] >= 0.999
        else:
            assert r['argmax_agreement'] is None  # backbones have no classes
    text = '\n'.join(bench_render.render_engines(section))
    assert 'CPU inference engines' in text and 'openvino' in text and 'no bf16 flags' in text

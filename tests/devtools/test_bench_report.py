"""`python -m twins_timm.devtools.bench_report`: a bench JSON made here rendered as docs/benchmarks.md's tables.

The JSON is written by hand in the bench's shape (no benchmark runs); test_bench.py renders a real run.
"""
from __future__ import annotations

import json

import pytest

from fresh_python import fresh_python
from twins_timm.devtools.bench_report import main


def _speed(images_per_s: float, pct_gemm: float) -> dict:
    return {'seconds': 2 / images_per_s, 'images_per_s': images_per_s, 'gflops': 100.0, 'pct_matmul': pct_gemm,
            'pct_gemm': pct_gemm}


def small_run() -> dict:
    row = {'batch': 2, 'height': 512, 'width': 512, 'precision': 'fp32'}
    return {
        'date': '2026-12-02 09:15 UTC',
        'machine': {'cpu': 'AMD EPYC 9B45', 'cores_available': 2, 'threads': 2, 'torch': '2.14.1',
                    'timm': '1.0.31', 'python': '3.12.3', 'platform': 'Linux-6.8', 'device': 'cpu'},
        'settings': {'repeats': 7, 'warmup': 2},
        'matmul': {'fp32': {'n': 2048, 'gflops': 194.2, 'onednn_gflops': 421.7, 'best_gflops': 421.7}},
        'backbones': [
            dict(row, variant='twins_svt_small', mode='eager', ratio=1.714, ours=_speed(8.1, 57.2),
                 timm=_speed(4.7, 33.4), exact={'ratio': 1.003}, ceiling={'pct_gemm': 79.4, 'ratio': 2.4}),
            dict(row, variant='twins_svt_small', mode='compiled', error='compile failed: RuntimeError: no cc'),
        ],
        'segmenters': {'available': False, 'reason': 'mmsegmentation is not installed', 'results': []},
        'memory': {'method': 'peak RSS', 'results': [
            dict(row, variant='twins_svt_small', without_checkpointing={'peak_bytes': 1536 * 2 ** 20},
                 with_checkpointing={'peak_bytes': 512 * 2 ** 20}, ratio=1 / 3)]},
        'engines': {'bf16_note': 'CPU flags avx512_bf16', 'results': [
            {'model': 'fpn twins_svt_small', 'batch': 1, 'height': 512, 'width': 512, 'engine': 'openvino',
             'dtype': 'bf16', 'images_per_s': 5.12, 'speedup': 2.338, 'export_seconds': 34.0,
             'first_call_seconds': 0.66, 'scaled_diff': 0.0103, 'argmax_agreement': 0.9943},
            {'model': 'fpn twins_svt_small', 'batch': 1, 'height': 512, 'width': 512, 'engine': 'onnxruntime',
             'dtype': 'bf16', 'skipped': 'no bf16 kernels'}]},
        'kernels': {'enabled': True, 'families': {  # a section of older runs (the removed kernel table)
            'linear': {'shapes': 12, 'chosen': {'onednn': 11, 'plain': 1},
                       'gflops': {'plain': {'min': 150, 'median': 180.4, 'max': 190},
                                  'onednn': {'min': 300, 'median': 390.6, 'max': 420}}}}},
    }


@pytest.fixture
def run_json(tmp_path):
    path = tmp_path / 'run-b.json'
    path.write_text(json.dumps(small_run()))
    return path


def test_renders_a_section_per_run_named_by_cpu_and_date(run_json, capsys):
    assert main([str(run_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith('## AMD EPYC 9B45, 2026-12-02 09:15 UTC\n')
    assert 'From `run-b.json`.' in out and '2 thread(s) of 2 cores' in out and 'torch 2.14.1, timm 1.0.31' in out
    assert 'Median of 7 timed runs after 2 warm-up runs' in out
    assert 'fp32 2048 x 2048 matmul: 194 GFLOP/s; the same product through oneDNN: 422 GFLOP/s.' in out
    assert ('| twins_svt_small | 2x512x512 | fp32 | eager | 8.10 | 4.70 | 1.71x | 1.00x | 57 | 33 | 79 | 2.40x |'
            in out)
    assert '| twins_svt_small | 2x512x512 | fp32 | compiled | compile failed: RuntimeError: no cc |' in out
    assert ('| fpn twins_svt_small | 1x512x512 | openvino | bf16 | 5.12 | 2.34x | 34.00 | 0.66 | 1.0e-02 | 99.43 % | - |'
            in out)
    assert '| fpn twins_svt_small | 1x512x512 | onnxruntime | bf16 | - | - | - | - | - | - | no bf16 kernels |' in out
    assert 'Segmenters vs mmseg: not measured (mmsegmentation is not installed).' in out
    assert '| twins_svt_small | 2x512x512 | fp32 | 1536 | 512 | 0.33 |' in out
    assert 'Kernels' not in out and '| linear |' not in out  # an older run's kernel section is skipped
    # every table row has as many cells as its header
    for block in out.split('\n\n'):
        lines = [line for line in block.splitlines() if line.startswith('|')]
        assert len({line.count(' | ') for line in lines if not line.startswith('|-')}) <= 1, block


def test_several_runs_in_order_and_an_undated_one(run_json, tmp_path, capsys):
    older = small_run()
    del older['date']
    older['machine']['cpu'] = 'AMD EPYC 7B13'
    (tmp_path / 'run-a.json').write_text(json.dumps(older))
    assert main([str(tmp_path / 'run-a.json'), str(run_json)]) == 0
    out = capsys.readouterr().out
    headings = [line for line in out.splitlines() if line.startswith('## ')]
    assert headings == ['## AMD EPYC 7B13, undated (no date in the JSON)', '## AMD EPYC 9B45, 2026-12-02 09:15 UTC']


@pytest.mark.parametrize('content, says', [
    (None, 'cannot read'),
    ('{"machine": ', 'is not JSON'),
    ('{"machine": {}}', 'is not a twins-timm bench result (no settings, matmul)'),
    ('[1, 2]', 'is not a twins-timm bench result'),
    ('{"machine": {}, "settings": {}, "matmul": {"fp32": 1}}', 'does not hold a complete twins-timm bench result'),
])
def test_bad_input_is_one_paragraph_and_nothing_printed(run_json, tmp_path, capsys, content, says):
    bad = tmp_path / 'bad.json'
    if content is not None:
        bad.write_text(content)
    assert main([str(run_json), str(bad)]) == 2  # a good file first: still nothing printed
    out, err = capsys.readouterr()
    assert out == ''
    assert err.startswith('bench_report: error: ') and says in err and str(bad) in err
    assert 'Traceback' not in err and err.count('\n') == 1


def test_module_entry_point(run_json):
    proc = fresh_python(module='twins_timm.devtools.bench_report', argv=[str(run_json)])
    assert proc.returncode == 0 and proc.stdout.startswith('## AMD EPYC 9B45, 2026-12-02 09:15 UTC')

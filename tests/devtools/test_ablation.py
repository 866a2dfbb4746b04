"""`python -m twins_timm.devtools.ablation`: each optimize trick switched off alone really is off, the rest
stays as ``optimize`` made it, the outputs stay the plain model's; the tool's JSON names every trick.

Nothing here is timed: the tool runs at 64x64 with shallow backbones and one round, and only the
structure of what it writes is checked.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from fresh_python import fresh_python
from numerics import FP32_TOL, scaled_diff
from twins_timm.devtools import ablation
from twins_timm.devtools.ablation import TRICKS, without
from twins_timm.devtools.bench import build_engine_model
from twins_timm.devtools.ablation_report import main as report_main

SHALLOW = dict(depths=[1, 1, 2, 1])  # SVT's stage 3: an LSA and a GSA block


@pytest.fixture(scope='module')
def plain_models():
    return {head: build_engine_model('twins_svt_small', head, 'cpu', 0, **SHALLOW) for head in ('fpn', 'upernet')}


def _count_probes(monkeypatch) -> dict:
    """Calls per trick on its own path: its classes' methods."""
    counts = {name: 0 for name in TRICKS}

    def wrap(owner, attr, trick):
        original = getattr(owner, attr)

        def counting(*args, **kwargs):
            counts[trick] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, attr, counting)
    for trick in TRICKS:
        for cls in TRICKS[trick].classes:
            for attr, fn in list(vars(cls).items()):
                if inspect.isfunction(fn):
                    wrap(cls, attr, trick)
    return counts


@pytest.mark.parametrize('trick', list(TRICKS))
def test_switching_one_trick_off_removes_it_and_keeps_the_rest_and_the_output(trick, plain_models, monkeypatch):
    plain = plain_models['upernet']  # every trick is in it
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    counts = _count_probes(monkeypatch)
    with torch.inference_mode():
        want = plain(x)
        assert not any(counts.values())  # the plain model takes none of the paths
        full, ablated = without(plain, None), without(plain, trick)
        full(x)
        in_full = dict(counts)
        counts.update((k, 0) for k in counts)
        got = ablated(x)
    assert in_full[trick] > 0 and counts[trick] == 0
    still = {t for t, n in in_full.items() if n and t != trick}
    assert still and all(counts[t] > 0 for t in still), {t: counts[t] for t in still}
    assert scaled_diff(got, want) <= FP32_TOL
    for cls in TRICKS[trick].classes:
        assert any(type(m) is cls for m in full.modules())
        assert not any(type(m) is cls for m in ablated.modules())
        assert any(type(m) is ablation.PLAIN_CLASS[cls] for m in ablated.modules())


def _run(tmp_path, *extra, **encoder_args):
    out = tmp_path / 'ablation.json'
    code = ablation.main(['--size', '1x64x64', '--repeats', '1', '--warmup', '1', '--quiet',
                          '--threads', '1',
                          '--json', str(out), '--variants', 'twins_svt_small', *extra], **encoder_args)
    return code, out


def test_tool_writes_every_trick_for_every_model(tmp_path, capsys):
    """FPN on both backbones (UPerHead's 512 channels: a second per call even here; its trick is tested above)."""
    code, out = _run(tmp_path, '--heads', 'fpn', '--variants', 'twins_pcpvt_small,twins_svt_small', **SHALLOW)
    assert code == 0
    run = json.loads(out.read_text())
    assert run['kind'] == 'ablation' and run['machine']['cpu'] and isinstance(run['machine']['cpu_flags'], list)
    assert run['settings']['size'] == '1x64x64' and run['settings']['repeats'] == 1
    assert set(run['tricks']) == set(TRICKS)
    assert [(m['head'], m['variant']) for m in run['models']] == [('fpn', 'twins_pcpvt_small'),
                                                                  ('fpn', 'twins_svt_small')]
    for m in run['models']:
        eager = m['eager']
        assert set(eager['tricks']) == set(TRICKS)
        assert eager['plain_seconds'] > 0 and eager['all_seconds'] > 0 and eager['scaled_diff_all_vs_plain'] <= FP32_TOL
        for name, r in eager['tricks'].items():
            if name == 'fused-pyramid-conv':  # UPerHead's: not in FPN
                assert r['skipped'] == 'not in this model', (name, r)
                continue
            assert 'skipped' not in r, (m['head'], name, r)
            assert isinstance(r['gain_pct'], float) and isinstance(r['clears_threshold'], bool)
            assert r['clears_threshold'] == (r['gain_pct'] >= ablation.THRESHOLD_PCT)
            assert len(r['all_seconds']) == 1 and r['scaled_diff_vs_plain'] <= FP32_TOL
        assert 'compiled' not in m
    apis = {a['api']: a for a in run['private_apis']}
    (hooks,) = apis.values()  # the one private torch API left on the path
    assert '_global_forward_hooks' in hooks['api'] and hooks['where'] == 'guards.has_hooks'
    assert set(hooks['figures']) == {'fpn twins_pcpvt_small', 'fpn twins_svt_small'}
    capsys.readouterr()
    assert report_main([str(out)]) == 0
    markdown = capsys.readouterr().out
    assert all('| %s |' % name in markdown for name in TRICKS)
    assert '| fpn pcpvt_small | fpn svt_small |' in markdown


@pytest.mark.parametrize('args,message', [
    (['--variants', 'twins_svt_tiny'], 'twins_svt_tiny'),
    (['--tricks', 'compiled-linear'], 'compiled-linear'),
    (['--repeats', '0'], '--repeats'),
])
def test_bad_arguments_exit_2_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablation, 'run_ablation', lambda *a, **k: pytest.fail('measured despite bad input'))
    code, out = _run(tmp_path, *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count('\n') == 1 and not out.exists()


def test_force_replaces_only_an_earlier_ablation(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ablation, 'run_ablation', lambda *a, **k: pytest.fail('measured despite bad input'))
    theirs = tmp_path / 'ablation.json'
    theirs.write_text('{"kind": "bench"}')
    assert _run(tmp_path)[0] == 2 and '--force' in capsys.readouterr().err
    assert _run(tmp_path, '--force')[0] == 2 and 'not an ablation result' in capsys.readouterr().err
    assert theirs.read_text() == '{"kind": "bench"}'


def test_module_runs_as_a_command_and_refuses_bad_input_in_one_paragraph(tmp_path):
    done = fresh_python(module='twins_timm.devtools.ablation', argv=['--heads', 'segformer', '--json',
                                                                    str(tmp_path / 'a.json')])
    assert done.returncode == 2 and done.stdout == ''
    assert done.stderr.startswith('ablation: error: ') and 'segformer' in done.stderr and 'Traceback' not in done.stderr
    assert not (tmp_path / 'a.json').exists()


def test_report_refuses_a_bench_json_in_one_paragraph(tmp_path, capsys):
    bench = tmp_path / 'bench.json'
    bench.write_text(json.dumps({'machine': {}, 'settings': {}, 'matmul': {}}))
    assert report_main([str(bench)]) == 2
    captured = capsys.readouterr()
    assert captured.out == '' and 'not an ablation result' in captured.err and captured.err.count('\n') == 1


def test_report_refuses_a_missing_file_in_one_paragraph(tmp_path, capsys):
    assert report_main([str(tmp_path / 'nothing.json')]) == 2
    err = capsys.readouterr().err
    assert 'cannot read' in err and 'nothing.json' in err and err.count('\n') == 1

"""`twins-timm export` and `segment` / `eval --engine onnxruntime|openvino --dtype`: the exported model where the
torch model was, same outputs in every inference mode, cached outside the user's folders, clear refusals.

The model is the tools' tiny stand-in segmenter (tests/tools_standin.py: exports in seconds); the Twins
graphs themselves are exported at free sizes in tests/deploy/test_deploy.py.  One cache folder serves the file, so
each engine exports once.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fresh_python import fresh_python
from tools_standin import TinySegmenter, random_rgb
from twins_timm import cli
from twins_timm.commands import export as export_cli
from twins_timm.deploy import engines, export
from twins_timm.commands import evaluate, segment
from twins_timm.zoo.resolve import LoadedModel

pytestmark = [
    pytest.mark.slow,  # exports take minutes
    pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ('onnx', 'onnxscript', 'onnxruntime', 'openvino')),
                       reason='the [deploy] extra is not installed (pip install "twins-timm[deploy]")'),
]


@pytest.fixture(scope='module')
def export_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp('twins_timm_cache')


@pytest.fixture
def model(monkeypatch, export_cache):
    """segment, eval and export load the stand-in; exports are cached in the module's cache folder."""
    monkeypatch.setenv('TWINS_TIMM_CACHE', str(export_cache))
    standin = TinySegmenter().eval()
    fake = lambda spec=None, **kw: LoadedModel(standin, 'stand-in')  # noqa: E731
    for module in (segment, evaluate, export_cli):
        monkeypatch.setattr(module, 'load_model', fake)
    return standin


def _labels(folder: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(folder / ('%s_labels.png' % name)))


def _segment(tmp_path: Path, out: str, *options: str) -> Path:
    assert cli.main(['segment', str(tmp_path / 'a.png'), str(tmp_path / 'b.png'), '--out', str(tmp_path / out),
                     '--quiet', '--scale', '96', '64', *options]) == 0
    return tmp_path / out


# ------------------------------------------------------------------------------------- export
def test_export_writes_a_checked_folder_with_free_sizes(tmp_path, model, capsys):
    out = tmp_path / 'exported'
    assert cli.main(['export', 'any-model', str(out), '--format', 'openvino']) == 0
    std = capsys.readouterr()
    assert 'tracing' in std.err and 'converting' in std.err  # stage lines as it goes
    assert 'pixel_values' in std.out and 'logits' in std.out
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'model.onnx',
                                                     'openvino_model.bin', 'openvino_model.xml']
    config = json.loads((out / 'config.json').read_text())
    assert config['input']['name'] == 'pixel_values' and config['output']['name'] == 'logits'
    assert config['input']['mean'] == list(model.mean) and config['input']['std'] == list(model.std)
    assert config['classes'] == 5 and config['class_names'] == model.class_names
    assert [(c['engine'], tuple(c['shape'])) for c in config['checks']] == [
        (engine, shape) for engine in ('onnxruntime', 'openvino') for shape in export.CHECK_SHAPES]
    assert export.folder_problem(out) is None  # every file's sha256 recorded
    assert 'pixel_values' in (out / 'README.md').read_text()
    import onnxruntime as ort
    session = ort.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    for shape in ((1, 3, 32, 32), (3, 3, 41, 77)):  # batch, height and width free
        x = torch.randn(*shape)
        got = session.run(None, {'pixel_values': x.numpy()})[0]
        with torch.inference_mode():
            assert np.abs(got - model(x).numpy()).max() < 1e-3, shape
    # an earlier export is replaced only with --force; anything else never
    assert cli.main(['export', 'any-model', str(out), '--quiet']) == 2
    assert '--force' in capsys.readouterr().err
    assert cli.main(['export', 'any-model', str(out), '--quiet', '--force']) == 0
    assert not (out / 'openvino_model.xml').exists()  # --format onnx this time
    (out / 'notes.txt').write_text('mine')
    assert cli.main(['export', 'any-model', str(out), '--quiet', '--force']) == 2
    assert 'not an earlier twins-timm export' in ' '.join(capsys.readouterr().err.split())  # lines wrap
    assert (out / 'notes.txt').read_text() == 'mine'


def test_export_never_writes_where_the_model_is(tmp_path, model, capsys):
    folder = tmp_path / 'my_model'
    folder.mkdir()
    (folder / 'config.json').write_text('{}')
    for out in (folder, folder / 'onnx', tmp_path):
        assert cli.main(['export', str(folder), str(out), '--quiet', '--force']) == 2
        assert 'overlap' in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ['config.json']


def test_export_check_catches_a_wrong_graph(tmp_path, model):
    with pytest.raises(export.ExportError, match='disagrees with torch'):
        export.check_against_torch('onnxruntime', lambda x: model(x) + 1.0, model, (1, 3, 40, 40))


# ------------------------------------------------------------------------------------ engines
@pytest.fixture
def photos(tmp_path):
    Image.fromarray(random_rgb(40, 56, 1)).save(tmp_path / 'a.png')
    Image.fromarray(random_rgb(40, 56, 2)).save(tmp_path / 'b.png')
    return tmp_path


@pytest.mark.parametrize('engine', ['onnxruntime', 'openvino'])
def test_segment_engines_match_torch_in_every_mode(photos, model, engine, export_cache):
    modes = (('--batch-size', '2'), ('--mode', 'slide', '--crop-size', '32', '--stride', '24', '--tta'))
    for i, options in enumerate(modes):
        want = _segment(photos, 'torch%d' % i, *options)
        calls = len(model.calls)
        got = _segment(photos, '%s%d' % (engine, i), '--engine', engine, *options)
        for name in ('a', 'b'):
            agree = (_labels(want, name) == _labels(got, name)).mean()
            assert agree >= 0.999, (engine, options, name, agree)
        assert len(model.calls) == calls or i == 0  # after the first export, torch never runs the model
    entries = [p for p in (export_cache / 'exports').glob('*/%s-*' % engine) if p.is_dir()]
    assert len(entries) == 1 and export.folder_problem(entries[0]) is None
    assert not list(photos.glob('**/*.onnx'))  # nothing exported into the user's folders


def test_cached_export_is_verified_and_redone_when_changed(photos, model, capsys):
    _segment(photos, 'first', '--engine', 'onnxruntime')
    [entry] = [p for p in (engines.zoo.cache_dir() / 'exports').glob('*/onnxruntime-*') if p.is_dir()]
    capsys.readouterr()
    assert cli.main(['segment', str(photos / 'a.png'), '--out', str(photos / 'again'), '--scale', '96', '64',
                     '--engine', 'onnxruntime']) == 0
    std = capsys.readouterr()
    assert 'Using the onnxruntime export cached' in std.err and 'Engine: onnxruntime fp32' in std.out
    with open(entry / 'model.onnx', 'ab') as f:
        f.write(b'\0')  # a changed file is never used
    assert cli.main(['segment', str(photos / 'a.png'), '--out', str(photos / 'third'), '--scale', '96', '64',
                     '--engine', 'onnxruntime']) == 0
    err = capsys.readouterr().err
    assert 'changed model.onnx' in err and 'exporting again' in err
    assert export.folder_problem(entry) is None
    assert np.array_equal(_labels(photos / 'third', 'a'), _labels(photos / 'first', 'a'))


def test_eval_engine_gives_the_same_miou(tmp_path, model):
    from tools_standin import ade_folder as _ade_folder
    data = _ade_folder(tmp_path / 'ade', 2, 5, size=(36, 48))
    results = {}
    for engine in ('torch', 'openvino'):
        path = tmp_path / ('%s.json' % engine)
        assert cli.main(['eval', '--data', str(data), '--scale', '64', '32',
                         '--engine', engine, '--json', str(path), '--quiet']) == 0
        results[engine] = json.loads(path.read_text())['mIoU']
    assert abs(results['openvino'] - results['torch']) <= 0.01


def test_bf16_engines(photos, model, monkeypatch):
    want = _segment(photos, 'fp32')
    monkeypatch.setattr(engines, 'native_bf16', lambda: (True, 'test'))
    for engine in ('torch', 'openvino'):
        got = _segment(photos, 'bf16-' + engine, '--engine', engine, '--dtype', 'bf16')
        assert (_labels(got, 'a') == _labels(want, 'a')).mean() > 0.5, engine  # same model, coarser numbers


# ------------------------------------------------------------------------------------ refusals
def _refused(capsys, tmp_path, *options: str) -> str:
    out = tmp_path / 'refused'
    assert cli.main(['segment', str(tmp_path / 'a.png'), '--out', str(out), *options]) == 2
    assert not out.exists()
    err = capsys.readouterr().err
    assert 'Traceback' not in err
    return ' '.join(err.split())


def test_engine_requests_refused_before_any_work(photos, model, monkeypatch, capsys):
    assert 'no bf16 kernels' in _refused(capsys, photos, '--engine', 'onnxruntime', '--dtype', 'bf16')
    assert 'runs on the CPU' in _refused(capsys, photos, '--engine', 'openvino', '--device', 'cuda')
    monkeypatch.setattr(engines, 'native_bf16', lambda: (False, 'this CPU has neither flag'))
    err = _refused(capsys, photos, '--engine', 'openvino', '--dtype', 'bf16')
    assert 'neither flag' in err and '--force-bf16' in err
    (photos / 'a_file').write_text('')
    monkeypatch.setenv('TWINS_TIMM_CACHE', str(photos / 'a_file'))
    assert 'export cache' in _refused(capsys, photos, '--engine', 'onnxruntime')
    monkeypatch.setitem(engines.ENGINE_MODULES, 'openvino', ('openvino', 'no_such_module_for_twins_test'))
    err = _refused(capsys, photos, '--engine', 'openvino')
    assert 'no_such_module_for_twins_test' in err and 'pip install "twins-timm[deploy]"' in err


def test_base_install_imports_no_engine_package():
    done = fresh_python('import sys; import twins_timm.deploy, twins_timm.commands.segment, twins_timm.commands.evaluate; '
                        'print(sorted(m for m in ("onnx", "onnxscript", "onnxruntime", "openvino") if m in sys.modules))')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '[]'


def test_eval_engine_shards_over_processes(tmp_path, monkeypatch):
    """torchrun: both processes want the export at once; one makes it, the other waits and uses it, and the
    summed metrics are the one-process torch engine's."""
    import launch as dist_tests
    from train_data import make_dataset
    from twins_timm.adapters import TwinsFPN
    torch.manual_seed(0)
    folder = tmp_path / 'model'
    TwinsFPN(encoder_name='twins_pcpvt_small', classes=4, encoder_args={'depths': [1, 1, 1, 1]},
             decoder_pyramid_channels=32, decoder_segmentation_channels=16).save_pretrained(str(folder))
    data = make_dataset(tmp_path / 'data', n_train=1, n_val=3)
    monkeypatch.setitem(dist_tests.ENV, 'TWINS_TIMM_CACHE', str(tmp_path / 'cache'))
    common = ['eval', '--data', data, '--model', folder, '--scale', '64', '48', '--quiet']
    rank0, rank1 = dist_tests.two_ranks(*common, '--engine', 'onnxruntime', '--json', tmp_path / 'two.json')
    assert cli.main(list(map(str, [*common, '--json', tmp_path / 'one.json']))) == 0
    one, two = (json.loads((tmp_path / n).read_text()) for n in ('one.json', 'two.json'))
    assert two['images'] == one['images'] == 3
    assert abs(two['mIoU'] - one['mIoU']) <= 0.01
    assert len([p for p in (tmp_path / 'cache' / 'exports').glob('*/onnxruntime-*') if p.is_dir()]) == 1

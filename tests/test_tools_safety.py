"""What a careless user can do to the command line: nothing is lost, mistakes fail before the work,
every user error is one paragraph with exit code 2 (issue 14)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tools_standin import TinySegmenter
from twins_timm import cli
from twins_timm.tools import evaluate as evaluate_mod
from twins_timm.tools import loading
from twins_timm.tools import segment as segment_mod
from twins_timm.tools.inference import InferenceSettings, merged_bands, ms_flip_settings, predict_labels
from twins_timm.tools.loading import LoadedModel


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _one_paragraph(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert 'Traceback' not in err and err.startswith('twins-timm %s: error: ' % command), err
    return ' '.join(err.split())


@pytest.fixture
def standin(monkeypatch):
    model = TinySegmenter().eval()
    fake = lambda spec=None, **kw: LoadedModel(model, 'stand-in')  # noqa: E731
    monkeypatch.setattr(segment_mod, 'load_model', fake)
    monkeypatch.setattr(evaluate_mod, 'load_model', fake)
    return model


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading a model."""
    def fail(*a, **k):
        raise AssertionError('the model was loaded before the mistake was reported')
    monkeypatch.setattr(segment_mod, 'load_model', fail)
    monkeypatch.setattr(evaluate_mod, 'load_model', fail)


# ----------------------------------------------------------------------------- data loss

def test_convert_never_replaces_its_source(tmp_path, capsys):
    src = tmp_path / 'w.safetensors'
    src.write_bytes(b'not really weights')
    assert cli.main(['convert', str(src), str(src), '--force']) == 2
    assert 'would overwrite the input' in _one_paragraph(capsys, 'convert')
    assert cli.main(['convert', str(src), str(tmp_path), '--force']) == 2
    assert 'holds SRC' in _one_paragraph(capsys, 'convert')
    assert src.read_bytes() == b'not really weights'


# ----------------------------------------------------------------------------- fail before the work

def test_convert_to_an_unwritable_place_is_one_paragraph(tmp_path, capsys):
    src = tmp_path / 'x.pth'
    torch.save({'a': torch.zeros(1)}, src)
    assert cli.main(['convert', str(src), '/proc/self/foo.safetensors']) == 2
    err = _one_paragraph(capsys, 'convert')
    assert 'not writable' in err and '.tmp' not in err and 'partial' not in err


# ----------------------------------------------------------------------------- the dispatcher

def test_unknown_command_version_and_bugs(monkeypatch, capsys):
    assert cli.main(['segmnet', 'x.png']) == 2
    err = capsys.readouterr().err
    assert "'segmnet'" in err and "Did you mean 'segment'" in err and 'convert, segment, eval' in err
    with pytest.raises(SystemExit) as e:
        cli.main(['--version'])
    assert e.value.code == 0 and 'twins-timm 0.1.0' in capsys.readouterr().out

    def buggy(args):
        raise KeyError('architecture')
    monkeypatch.setattr(segment_mod, 'run', buggy)
    with pytest.raises(KeyError):  # a bug keeps its traceback
        cli.main(['segment'])


def test_top_level_help_imports_no_command_module():
    code = ('import sys, contextlib, io\n'
            'from twins_timm import cli\n'
            'with contextlib.redirect_stdout(io.StringIO()) as out:\n'
            '    try: cli.main(["--help"])\n'
            '    except SystemExit: pass\n'
            'assert "segment" in out.getvalue() and "Convert a Twins checkpoint" in out.getvalue()\n'
            'print(sorted(m for m in sys.modules if m.startswith(("twins_timm.tools", "twins_timm.convert", '
            '"twins_timm.adapters", "segmentation_models_pytorch"))))\n')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == '[]'


# ----------------------------------------------------------------------------- feedback

def test_tta_holds_one_view_at_a_time(standin):
    """Memory: each flipped copy has its own forward, and a view is released before the next."""
    standin.calls.clear()
    settings = ms_flip_settings(scale=(64, 48))
    predict_labels(standin, _rgb(40, 48), settings)
    assert [c[0] for c in standin.calls] == [1] * 12  # batch 1: no plain + flip pair in one forward
    refs = []

    def views():
        for _ in range(4):
            assert not refs or refs[-1]() is None, 'the previous view is still held'
            v = torch.randn(1, 5, 12, 16)
            refs.append(weakref.ref(v))
            yield v
            del v
    (_, _, merged), = list(merged_bands(views(), (9, 11)))
    assert merged.shape == (1, 5, 9, 11)


# ----------------------------------------------------------------------------- honest hints

def test_uint8_input_hint_names_the_segmenters_own_normalisation():
    from twins_timm.adapters import TwinsFPN
    model = TwinsFPN(encoder_name='twins_pcpvt_small', classes=3, decoder_pyramid_channels=16,
                     decoder_segmentation_channels=16, mean=(10.0, 20.0, 30.0), std=(2.0, 3.0, 4.0)).eval()
    with pytest.raises(ValueError) as e:
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    msg = str(e.value)
    assert 'mean=[10.0, 20.0, 30.0]' in msg and 'std=[2.0, 3.0, 4.0]' in msg
    assert 'do not divide by 255' in msg

"""Safe reading (no code ever unpickled, clear errors on bad files) and atomic, non-clobbering writing."""
import argparse
import os
import pickle
import signal
import textwrap
import time

import pytest
import torch

from checkpoint_factory import random_state_dict, write_checkpoint
from fresh_python import start_python
from twins_timm.convert import CheckpointReadError, UnsafeCheckpointError, convert_checkpoint, load_file
from twins_timm.files.atomic import atomic_path, save_safetensors, save_torch


class _Payload:
    """Unpickling this runs os.system('touch MARKER')."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, ('touch %s' % self.marker,)


@pytest.fixture(scope='module')
def small_sd():
    return {'patch_embeds.0.proj.weight': torch.randn(4, 3, 4, 4), 'x': torch.arange(3)}


def test_code_executing_pickle_is_refused_and_has_no_effect(tmp_path, small_sd):
    marker = tmp_path / 'PWNED'
    # both the zip (torch.save) and the legacy (plain pickle) layouts
    zipped = tmp_path / 'evil.pth'
    torch.save({'model': small_sd, 'x': _Payload(marker)}, zipped)
    legacy = tmp_path / 'evil_legacy.pth'
    with open(legacy, 'wb') as f:
        pickle.dump({'model': _Payload(marker)}, f, protocol=2)
    for path in (zipped, legacy):
        with pytest.raises(UnsafeCheckpointError, match='refused.*never unpickles code') as e:
            convert_checkpoint(path)
        assert 'system' in str(e.value)
        assert not marker.exists()
    # an object that is harmless but not allow-listed is refused too: the allow-list is exact
    other = tmp_path / 'other.pth'
    torch.save({'model': small_sd, 'when': __import__('datetime').date(2024, 1, 1)}, other)
    with pytest.raises(UnsafeCheckpointError, match='datetime'):
        load_file(other)


def test_namespace_training_checkpoint_loads(tmp_path):
    name = 'official/alt_gvt_small'
    sd = random_state_dict(name, seed=0)
    path = write_checkpoint(name, tmp_path / 'alt_gvt_small.pth', sd=sd, training_extras=True)
    # the real-world reason for the allow-list: plain weights_only loading refuses this file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    obj = load_file(path)
    assert isinstance(obj['args'], argparse.Namespace) and obj['epoch'] == 299
    res = convert_checkpoint(path)
    assert (res.format, res.wrapper, res.task, res.num_classes) == ('official_cls', 'model', 'classification', 1000)
    assert torch.equal(res.state_dict['head.weight'], sd['head.weight'])
    # the allow-list is scoped to our load: torch's global one is unchanged afterwards
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    # files from torch < 1.6 (legacy, non-zip layout) too
    legacy = tmp_path / 'legacy.pth'
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=0.1)}, legacy,
               _use_new_zipfile_serialization=False)
    obj = load_file(legacy)
    assert obj['args'].lr == 0.1 and torch.equal(obj['model']['w'], torch.ones(2))


@pytest.mark.parametrize('case', ['empty', 'truncated', 'random', 'truncated_safetensors', 'text'])
def test_broken_files_give_clear_errors(tmp_path, small_sd, case):
    path = tmp_path / ('bad.safetensors' if 'safetensors' in case else 'bad.pth')
    if case == 'empty':
        path.write_bytes(b'')
        pattern = 'empty'
    elif case == 'truncated':
        torch.save(small_sd, tmp_path / 'ok.pth')
        data = (tmp_path / 'ok.pth').read_bytes()
        path.write_bytes(data[: len(data) // 2])
        pattern = 'truncated'
    elif case == 'random':
        path.write_bytes(os.urandom(4096))
        pattern = 'not a PyTorch checkpoint|could not be read'
    elif case == 'truncated_safetensors':
        save_safetensors(small_sd, tmp_path / 'ok.safetensors')
        data = (tmp_path / 'ok.safetensors').read_bytes()
        path.write_bytes(data[:-20])
        pattern = 'not a valid safetensors file'
    else:
        path.write_text('hello, I am not a checkpoint\n')
        pattern = 'not a PyTorch checkpoint|could not be read'
    with pytest.raises(CheckpointReadError, match=pattern) as e:
        convert_checkpoint(path)
    assert str(path) in str(e.value)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        convert_checkpoint(tmp_path / 'missing.pth')


def test_safetensors_input_is_read(tmp_path):
    sd = random_state_dict('official/pcpvt_small_v0', seed=5)
    save_safetensors(sd, tmp_path / 'w.safetensors')
    res = convert_checkpoint(tmp_path / 'w.safetensors')
    assert (res.format, res.variant, res.task) == ('timm', 'twins_pcpvt_small', 'classification')
    assert torch.equal(res.state_dict['blocks.2.5.attn.kv.weight'], sd['blocks.2.5.attn.kv.weight'])


def test_atomic_write_never_overwrites_without_force(tmp_path, small_sd):
    dst = tmp_path / 'out.safetensors'
    save_safetensors(small_sd, dst)
    before = dst.read_bytes()
    with pytest.raises(FileExistsError, match='--force'):
        save_safetensors({'y': torch.zeros(2)}, dst)
    assert dst.read_bytes() == before
    save_safetensors({'y': torch.zeros(2)}, dst, force=True)
    assert dst.read_bytes() != before
    # an error mid-write leaves neither the destination nor a temporary behind
    dst2 = tmp_path / 'out2.pth'
    with pytest.raises(RuntimeError, match='boom'):
        with atomic_path(dst2) as tmp:
            tmp.write_bytes(b'partial')
            raise RuntimeError('boom')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out.safetensors']
    # a folder of ours is replaced as a whole with force; one holding anything else never is
    folder = tmp_path / 'folder'
    folder.mkdir()
    (folder / 'config.json').write_text('{"_model_class": "TwinsFPN"}')
    with pytest.raises(FileExistsError):
        with atomic_path(folder, folder=True) as tmp:
            pass
    with atomic_path(folder, force=True, folder=True) as tmp:
        (tmp / 'config.json').write_text('{"twins_timm": {}}')
    assert sorted(p.name for p in folder.iterdir()) == ['config.json']
    assert 'twins_timm' in (folder / 'config.json').read_text()
    (folder / 'notes.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='not written by twins-timm.*notes.txt'):
        with atomic_path(folder, force=True, folder=True) as tmp:
            (tmp / 'config.json').write_text('{"twins_timm": {}}')
    assert (folder / 'notes.txt').read_text() == 'mine'


def test_kill_mid_write_leaves_no_output(tmp_path):
    """SIGKILL while a large file is being written: no DST, only a hidden partial the next write removes."""
    dst = tmp_path / 'big.pth'
    started = tmp_path / 'started'
    script = textwrap.dedent('''
        import sys, time
        from pathlib import Path
        from twins_timm.files.atomic import atomic_path
        dst, started = Path(sys.argv[1]), Path(sys.argv[2])
        with atomic_path(dst) as tmp:
            with open(tmp, 'wb') as f:
                chunk = b'\\0' * (1 << 20)
                for i in range(100000):
                    f.write(chunk)
                    f.flush()
                    if i == 4:
                        started.write_text('go')
                    time.sleep(0.01)
    ''')
    proc = start_python(script, argv=[dst, started])
    try:
        deadline = time.time() + 60
        while not started.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert started.exists(), 'writer never started'
        partial = [p for p in tmp_path.iterdir() if p.name.startswith('.big.pth.partial-')]
        assert partial and partial[0].stat().st_size >= 5 << 20  # it really was mid-write
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith('.')] == ['started']
    # the next writer of the same destination cleans up the dead writer's partial file
    save_torch({'a': torch.zeros(1)}, dst)
    assert dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.big.pth.partial-')]

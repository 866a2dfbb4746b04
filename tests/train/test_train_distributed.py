"""torchrun: 2 CPU processes (gloo) train like one with the same global batch; eval / segment
shard their inputs with exactly the one-process results; kill -9 and --resume.

Training goes through a real ``torchrun -m twins_timm`` (what users run). The other multi-process
cases start their processes from tests/fresh_python.py's fork server (torch imported once) with the
environment torchrun gives its workers: the same process group, sharding and reduction code, without
three fresh interpreters per launch."""
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from twins_timm.adapters import from_pretrained
from twins_timm.cli import main as cli_main
from twins_timm.train import checkpoint_folders

from fresh_python import start_python
from launch import ENV, torchrun, two_ranks
from train_data import SHALLOW_DEPTHS, make_dataset, tiny_model

@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('ade') / 'data', n_train=8, n_val=3)


@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
    # SVT-S with 2 blocks per stage (both attention kinds, SyncBN decoder): the comparisons are about
    # processes, not depth; a train step costs ~0.1 s, so the torchrun / fork-server start-ups dominate
    folder = tmp_path_factory.mktemp('model') / 'tiny'
    tiny_model(dropout=False, depths=SHALLOW_DEPTHS).save_pretrained(str(folder))
    return folder


def _train_args(data, model, out, *extra):
    return ['train', '--data', data, '--model', model, '--out', out, '--crop-size', '64', '--workers', '0',
            '--quiet', '--device', 'cpu', *extra]


def _last_miou(out):
    records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    return [r['mIoU_percent'] for r in records if 'mIoU_percent' in r][-1]


def test_two_processes_train_like_one(dataset, model_folder, tmp_path):
    common = ['--iters', '3', '--global-batch', '4', '--lr', '5e-4', '--drop-path-rate', '0',
              '--eval-interval', '3', '--log-interval', '1']
    one, two = tmp_path / 'one', tmp_path / 'two'
    ddp = torchrun(*_train_args(dataset, model_folder, two, '--batch-size', '2', *common))
    assert 'sync_bn              True' in ddp.stdout and ddp.stdout.count('mIoU:') == 1  # rank 0 reports
    assert cli_main(list(map(str, _train_args(dataset, model_folder, one, '--batch-size', '4', *common)))) == 0
    start = load_file(str(model_folder / 'model.safetensors'))
    a = load_file(str(checkpoint_folders(one)[-1] / 'model.safetensors'))
    b = load_file(str(checkpoint_folders(two)[-1] / 'model.safetensors'))
    keys = [k for k in a if a[k].is_floating_point() and 'running' not in k]
    da = torch.cat([(a[k] - start[k]).flatten() for k in keys])
    db = torch.cat([(b[k] - start[k]).flatten() for k in keys])
    # AdamW's first steps are ~lr * sign(grad): parameters whose gradient is ~0 may differ by fp32
    # noise; measured 1e-4 of the elements above 1e-6, update difference 8e-5 of the update norm
    assert da.abs().max() > 1e-4
    assert (da - db).norm() / da.norm() < 1e-3 and ((da - db).abs() > 1e-5).float().mean() < 1e-3
    for k in (k for k in a if 'running' in k):  # SyncBN statistics over both processes' images
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    log = lambda out: [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]  # noqa: E731
    loss = lambda out: [r['loss'] for r in log(out) if 'loss' in r]  # noqa: E731
    assert loss(one) == pytest.approx(loss(two), rel=1e-5) and len(loss(one)) == 3
    assert _last_miou(one) == pytest.approx(_last_miou(two), abs=0.05)  # percent; measured: identical


def test_eval_and_segment_shard_over_processes(dataset, model_folder, tmp_path):
    common = ['--data', dataset, '--model', model_folder, '--no-resize', '--quiet', '--device', 'cpu']
    two_ranks('eval', *common, '--json', tmp_path / 'two.json')
    assert cli_main(list(map(str, ['eval', *common, '--json', tmp_path / 'one.json']))) == 0
    one, two = (json.loads((tmp_path / n).read_text()) for n in ('one.json', 'two.json'))
    assert two['images'] == one['images'] == 3
    assert two['mIoU'] == one['mIoU'] and two['per_class'] == one['per_class']  # exact: summed counts

    images = sorted((dataset / 'images' / 'validation').iterdir())
    seg = ['segment', *images, '--model', model_folder, '--no-resize', '--quiet', '--device', 'cpu']
    rank0, rank1 = two_ranks(*seg, '--out', tmp_path / 'seg2')
    assert 'Wrote 3 class-index PNG(s)' in rank0.stdout and 'Wrote' not in rank1.stdout  # rank 0 reports
    assert cli_main(list(map(str, [*seg, '--out', tmp_path / 'seg1']))) == 0
    one_files = sorted(os.listdir(tmp_path / 'seg1'))
    assert sorted(os.listdir(tmp_path / 'seg2')) == one_files and len(one_files) == 6
    for name in one_files:
        assert np.array_equal(np.asarray(Image.open(tmp_path / 'seg1' / name)),
                              np.asarray(Image.open(tmp_path / 'seg2' / name))), name


def test_kill_9_then_resume_ends_like_an_uninterrupted_run(dataset, model_folder, tmp_path):
    common = ['--iters', '4', '--save-interval', '2', '--eval-interval', '0', '--batch-size', '2',
              '--global-batch', '2', '--lr', '5e-4', '--log-interval', '1']  # drop path 0.2 (the recipe's): RNG state matters
    killed = tmp_path / 'killed'
    proc = start_python(module='twins_timm', argv=_train_args(dataset, model_folder, killed, *common),
                        env=dict(ENV, OMP_NUM_THREADS=str(torch.get_num_threads())))
    try:
        deadline = time.time() + 300
        while not (killed / 'checkpoints' / 'iter_000002').exists():
            assert proc.poll() is None, (proc.wait(), proc.stderr[-2000:])
            assert time.time() < deadline
            time.sleep(0.02)
        proc.kill()  # SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.wait() == -signal.SIGKILL
    saved = checkpoint_folders(killed)
    assert saved and saved[-1].name != 'iter_000004'
    for folder in (killed / 'checkpoints').iterdir():  # every visible checkpoint loads
        if not folder.name.startswith('.'):
            assert folder in saved and from_pretrained(str(folder)).classes == 4

    assert cli_main(list(map(str, _train_args(dataset, model_folder, killed, *common, '--resume')))) == 0
    whole = tmp_path / 'whole'
    assert cli_main(list(map(str, _train_args(dataset, model_folder, whole, *common)))) == 0
    a = load_file(str(checkpoint_folders(killed)[-1] / 'model.safetensors'))
    b = load_file(str(checkpoint_folders(whole)[-1] / 'model.safetensors'))
    assert checkpoint_folders(killed)[-1].name == 'iter_000004'
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
    losses = lambda out: [json.loads(l)['loss'] for l in (out / 'metrics.jsonl').read_text().splitlines()]  # noqa: E731
    assert len(losses(whole)) == 4 and losses(killed) == pytest.approx(losses(whole), rel=1e-5)

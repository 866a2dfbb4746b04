"""`twins-timm train` / twins_timm.train: mmseg's recipe, data checks, learning, checkpoints."""
import glob
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from twins_timm.adapters import TwinsFPN, TwinsUPerNet, from_pretrained
from twins_timm.cli import main as cli_main
from twins_timm.train import (DatasetError, check_pairs, checkpoint_folders, find_pairs,
                              fit, lr_factor, param_groups, recipe_for)
from twins_timm.train.run_folder import STATE_FILE, save_checkpoint
from twins_timm.train.transforms import RandomCropCatMax, train_transform

from train_data import SHALLOW_DEPTHS, make_dataset, tiny_model

MMSEG_CONFIGS = os.path.join(os.path.dirname(__import__('mmseg').__file__), '.mim', 'configs')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp('ade') / 'data')


# ----------------------------------------------------------------------------- recipe

@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(MMSEG_CONFIGS, 'twins', '*.py'))),
                         ids=os.path.basename)
def test_recipe_is_mmseg_config(path):
    """Every default equals the value in mmseg's own Twins config (read with mmengine)."""
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    name = os.path.basename(path)
    head = 'upernet' if '_uperhead_' in name else 'fpn'
    arch, size = name.split('_')[1].split('-')
    encoder = 'twins_%s_%s' % (arch, dict(s='small', b='base', l='large')[size])
    r = recipe_for(head, encoder)
    assert r.config == name
    opt = cfg.optim_wrapper.optimizer
    assert (opt.type, r.lr, r.weight_decay) == ('AdamW', opt.lr, opt.weight_decay)
    assert r.betas == tuple(opt.get('betas', (0.9, 0.999)))
    keys = (cfg.optim_wrapper.get('paramwise_cfg') or {}).get('custom_keys', {})
    assert set(r.no_decay_keys) == {k for k, v in keys.items() if v.get('decay_mult') == 0.0}
    sched = {s.type: s for s in cfg.param_scheduler}
    if 'LinearLR' in sched:
        assert (r.warmup_iters, r.warmup_start_factor) == (sched['LinearLR'].end, sched['LinearLR'].start_factor)
    else:
        assert r.warmup_iters == 0
    poly = sched['PolyLR']
    assert (r.poly_power, r.eta_min, r.iters) == (poly.power, poly.eta_min, poly.end) and poly.end == cfg.train_cfg.max_iters
    assert r.global_batch == 8 * cfg.train_dataloader.batch_size
    assert r.drop_path_rate == cfg.model.backbone.drop_path_rate
    if cfg.model.get('auxiliary_head'):
        assert r.aux_weight == cfg.model.auxiliary_head.loss_decode.loss_weight
    pipeline = {t['type']: t for t in cfg.train_pipeline}
    assert r.scale == pipeline['RandomResize']['scale'] and r.ratio_range == pipeline['RandomResize']['ratio_range']
    assert (r.crop_size, r.cat_max_ratio) == (pipeline['RandomCrop']['crop_size'][0], pipeline['RandomCrop']['cat_max_ratio'])
    assert r.flip_prob == pipeline['RandomFlip']['prob'] and 'PhotoMetricDistortion' in pipeline


def test_schedule_matches_mmengine():
    """LinearLR warm-up then PolyLR, step by step, as mmengine's schedulers compute them."""
    from mmengine.optim import LinearLR, PolyLR
    r = recipe_for('upernet', 'twins_svt_small', iters=60)
    r.warmup_iters = 10
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=r.lr)
    scheds = [LinearLR(opt, start_factor=r.warmup_start_factor, by_epoch=False, begin=0, end=10),
              PolyLR(opt, eta_min=r.eta_min, power=r.poly_power, by_epoch=False, begin=10, end=60)]
    for step in range(60):
        assert opt.param_groups[0]['lr'] == pytest.approx(r.lr * lr_factor(r, step), rel=1e-6, abs=1e-12), step
        for s in scheds:
            s.step()
    fpn = recipe_for('fpn', 'twins_svt_small', iters=50)
    assert all(lr_factor(fpn, s) == pytest.approx(1.0) for s in range(50))  # eta_min == lr: flat, as the config


def test_no_decay_groups_match_mmengine():
    """Norms and position convs without weight decay, exactly the parameters mmengine picks."""
    from mmengine.optim import DefaultOptimWrapperConstructor
    model = tiny_model()
    r = recipe_for('upernet', 'twins_svt_small')
    wrapper = DefaultOptimWrapperConstructor(
        dict(type='OptimWrapper', optimizer=dict(type='AdamW', lr=r.lr, weight_decay=r.weight_decay)),
        paramwise_cfg=dict(custom_keys={k: dict(decay_mult=0.0) for k in r.no_decay_keys}))(model)
    ref = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    ours = {id(p): g['weight_decay'] for g in param_groups(model, r) for p in g['params']}
    assert ours == ref
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = [names[i] for i, wd in ours.items() if wd == 0]
    assert any('pos_block' in n for n in no_decay) and any('norm' in n for n in no_decay)
    assert not any('.bn.' in n for n in no_decay)  # head BN has no 'norm' in its name (mmseg: bn)


# ----------------------------------------------------------------------------- transforms

def test_train_transform_crops_pads_and_keeps_labels():
    gen = np.random.default_rng(0)
    label = torch.from_numpy(gen.integers(0, 3, (30, 50)))
    image = tv_tensors.Image(torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8))
    t = train_transform(64, (0, 0, 0), (1, 1, 1))
    padded = 0
    for seed in range(6):
        torch.manual_seed(seed)
        x, y = t(image, tv_tensors.Mask(label))
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y.shape == (64, 64)
        values = set(y.unique().tolist())
        assert values <= {0, 1, 2, 255}
        padded += 255 in values
        assert (x[:, y == 255] == 0).all()  # padding: image 0 (after normalising), labels ignored
    assert padded  # 30 px high images scaled by (0.5..2)*64/30 are sometimes under 64
    torch.manual_seed(3)
    a = t(image, tv_tensors.Mask(label))
    torch.manual_seed(3)
    b = t(image, tv_tensors.Mask(label))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cat_max_ratio_avoids_single_class_crops():
    mask = torch.zeros(100, 100, dtype=torch.long)
    mask[:, 90:] = 1  # class 0 dominates almost every 32 px crop
    crop = RandomCropCatMax(32, 0.75)
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))
    torch.manual_seed(0)
    plain = sum(len(RandomCropCatMax(32, 1.0)(image, tv_tensors.Mask(mask))[1].unique()) > 1 for _ in range(30))
    torch.manual_seed(0)
    mixed = sum(len(crop(image, tv_tensors.Mask(mask))[1].unique()) > 1 for _ in range(30))
    assert mixed > plain


# ----------------------------------------------------------------------------- data checks

def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_check_pairs_reports_every_problem(dataset, tmp_path):
    data = _copy(dataset, tmp_path / 'd')
    pairs = find_pairs(data, 'training')
    check_pairs(pairs, 4)  # the good set passes
    ann = data / 'annotations' / 'training'
    Image.new('L', (10, 10)).save(ann / 'training_001.png')                       # wrong size
    Image.new('RGB', (80, 64)).save(ann / 'training_002.png')                     # wrong mode
    Image.fromarray(np.full((64, 80), 9, np.uint8)).save(ann / 'training_003.png')  # label 9 > 4 classes
    with pytest.raises(DatasetError) as e:
        check_pairs(pairs, 4, what='training')
    msg = str(e.value)
    assert '3 of 8' in msg and '10x10' in msg and "mode RGB" in msg and 'label(s) 9' in msg
    with pytest.raises(DatasetError, match='2 of 8'):  # headers only (eval): labels not decoded
        check_pairs(pairs)
    (ann / 'training_004.png').unlink()
    with pytest.raises(FileNotFoundError, match='no annotation'):
        find_pairs(data, 'training')
    with pytest.raises(FileNotFoundError, match='images/nope'):
        find_pairs(data, 'nope')


def test_eval_checks_annotations_before_loading_the_model(dataset, tmp_path, capsys):
    data = _copy(dataset, tmp_path / 'd')
    Image.new('L', (5, 5)).save(data / 'annotations' / 'validation' / 'validation_003.png')
    rc = cli_main(['eval', '--data', str(data), '--model', str(tmp_path / 'no-model-here'), '--quiet'])
    err = _err(capsys)
    assert rc == 2 and 'validation_003.png is 5x5' in err and 'no-model-here' not in err


# ----------------------------------------------------------------------------- it learns

@pytest.fixture(scope='module')
def trained(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp('run') / 'out'
    lines = []
    result = fit(tiny_model(depths=SHALLOW_DEPTHS), dataset, out, iters=24, batch_size=4, global_batch=4,
                 crop_size=64, lr=1e-3,
                 save_interval=12, eval_interval=12, log_interval=6, workers=0, progress=False, log=lines.append)
    return result, out, lines


def test_fit_learns_tiny_shapes(trained):
    result, out, lines = trained
    losses = [l for _, l in result.losses]
    assert losses[-1] < 0.6 * losses[0], losses
    # measured on the shapes set: mIoU ~0.4 after 12 steps, 0.6-0.8 after 24 (random init ~0.1)
    assert result.evals[-1]['mIoU'] > 0.5 and result.evals[-1]['mIoU'] > result.evals[0]['mIoU'] - 0.05
    assert lines[-1] == 'mIoU: %.2f' % (100 * result.miou)
    assert any('lr' in l and '0.001' in l for l in lines)  # settings printed at the start


def test_fit_writes_loadable_checkpoints_and_logs(trained, dataset):
    result, out, lines = trained
    ckpts = checkpoint_folders(out)
    assert [p.name for p in ckpts] == ['iter_000012', 'iter_000024'] and result.last_checkpoint == ckpts[-1]
    assert (out / 'last_checkpoint').read_text().strip() == 'checkpoints/iter_000024'
    model = from_pretrained(str(ckpts[-1])).eval()
    assert model.classes == 4 and isinstance(model, TwinsUPerNet)
    stored = json.loads((ckpts[-1] / 'recipe.json').read_text())
    assert stored['recipe']['lr'] == 1e-3 and stored['settings']['batch_per_process'] == 4
    state = torch.load(ckpts[-1] / STATE_FILE, weights_only=True)
    assert state['iter'] == 24 and 'optimizer' in state and state['rng']
    records = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [r['iter'] for r in records if 'loss' in r] == [6, 12, 18, 24]
    evals = [r for r in records if 'mIoU_percent' in r]
    assert [r['iter'] for r in evals] == [12, 24]
    # the files hold what the console prints: percent, 2 decimals
    assert lines[-1] == 'mIoU: %.2f' % evals[-1]['mIoU_percent'] and evals[-1]['mIoU_percent'] > 1
    best = json.loads((out / 'best' / 'recipe.json').read_text())
    assert best['metrics']['mIoU_percent'] == round(100 * result.best_miou, 2)
    assert json.loads((ckpts[-1] / 'config.json').read_text())['test_scale'] == [256, 64]  # crop 64: (4 c, c)
    assert from_pretrained(str(out / 'best')).classes == 4
    # segment --model loads a checkpoint folder
    img = sorted((dataset / 'images' / 'validation').iterdir())[0]
    seg = out.parent / 'seg'
    assert cli_main(['segment', str(img), '--model', str(ckpts[-1]), '--out', str(seg), '--quiet',
                     '--device', 'cpu']) == 0
    assert (seg / (img.stem + '.png')).exists() or any(seg.iterdir())


def test_interrupted_save_leaves_only_complete_checkpoints(tmp_path, monkeypatch):
    model = tiny_model(TwinsFPN, depths=SHALLOW_DEPTHS)
    r = recipe_for('fpn', 'twins_svt_small', iters=4)
    (tmp_path / 'out').mkdir()
    save_checkpoint(tmp_path / 'out', 2, model, dict(iter=2), r, {})

    def boom(*a, **k):
        raise KeyboardInterrupt  # as a kill in the middle of writing the state
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / 'out', 4, model, dict(iter=4), r, {})
    assert [p.name for p in checkpoint_folders(tmp_path / 'out')] == ['iter_000002']
    assert sorted(p.name for p in (tmp_path / 'out' / 'checkpoints').iterdir()) == ['iter_000002']
    assert (tmp_path / 'out' / 'last_checkpoint').read_text().strip() == 'checkpoints/iter_000002'


# ----------------------------------------------------------------------------- bad input, exit 2

@pytest.fixture(scope='module')
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('model') / 'tiny'
    tiny_model(dropout=False, depths=SHALLOW_DEPTHS).save_pretrained(str(folder))
    return folder


def _err(capsys):
    return ' '.join(capsys.readouterr().err.split())


def _train(data, model, out, *extra):
    return cli_main(['train', '--data', str(data), '--model', str(model), '--out', str(out), '--iters', '2',
                     '--batch-size', '2', '--global-batch', '2', '--crop-size', '64', '--workers', '0',
                     '--quiet', '--device', 'cpu', *extra])


def test_train_refuses_bad_input_before_training(dataset, model_folder, tmp_path, capsys):
    # an --out holding another run, or any files, without --resume: nothing touched
    out = tmp_path / 'other'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    assert _train(dataset, model_folder, out) == 2
    assert 'already holds' in _err(capsys) and (out / 'notes.txt').read_text() == 'mine'
    assert sorted(p.name for p in out.iterdir()) == ['notes.txt']
    # --resume on a folder that is not a run
    assert _train(dataset, model_folder, out, '--resume') == 2
    assert 'no twins-timm training run' in _err(capsys)
    # unwritable --out (below a file)
    assert _train(dataset, model_folder, out / 'notes.txt' / 'x') == 2
    assert 'not writable' in _err(capsys)
    # labels >= classes
    assert _train(dataset, model_folder, tmp_path / 'o2', '--classes', '2') == 2
    err = _err(capsys)
    assert 'label(s) 3, 4' in err and '2 classes' in err and not (tmp_path / 'o2').exists()
    # missing split
    data = _copy(dataset, tmp_path / 'd')
    import shutil
    shutil.rmtree(data / 'images' / 'validation')
    assert _train(data, model_folder, tmp_path / 'o3') == 2
    assert 'images/validation is not a folder' in _err(capsys)
    # counts that do not match: an annotation without an image
    data = _copy(dataset, tmp_path / 'd2')
    Image.new('L', (80, 64)).save(data / 'annotations' / 'training' / 'stray.png')
    assert _train(data, model_folder, tmp_path / 'o4') == 2
    assert 'have no image' in _err(capsys)
    # tiny crop, batch that does not divide the global batch
    assert _train(dataset, model_folder, tmp_path / 'o5', '--crop-size', '16') == 2
    assert 'at least 32' in _err(capsys)
    assert _train(dataset, model_folder, tmp_path / 'o6', '--global-batch', '3') == 2
    assert 'cannot be split' in _err(capsys)
    assert not any((tmp_path / n).exists() for n in ('o3', 'o4', 'o5', 'o6'))


@pytest.mark.parametrize('option, value, message', [
    ('--iters', '-1', '--iters must be at least 1'),
    ('--lr', '0', '--lr must be positive'),
    ('--batch-size', '0', '--batch-size must be at least 1'),
    ('--save-interval', '0', '--save-interval must be at least 1'),
    ('--eval-interval', '-2', '--eval-interval must be at least 0'),
    ('--workers', '-1', '--workers must be at least 0'),
    ('--drop-path-rate', '1.5', '--drop-path-rate must be in [0, 1)'),
])
def test_train_refuses_bad_numbers_before_building_a_model(dataset, tmp_path, monkeypatch, capsys, option, value,
                                                          message):
    import twins_timm.train as train_pkg

    def no_model(*a, **k):
        raise AssertionError('a model was built (or downloaded) before the mistake was reported')
    monkeypatch.setattr(train_pkg, 'build_model', no_model)
    assert _train(dataset, 'upernet:twins_svt_small', tmp_path / 'o', option, value) == 2
    assert message in _err(capsys) and not (tmp_path / 'o').exists()


def test_train_command_new_classes_and_help(dataset, model_folder, tmp_path, capsys):
    names = tmp_path / 'names.txt'
    names.write_text('bg\nred\ngreen\nblue\nextra\n')
    out = tmp_path / 'o'
    assert _train(dataset, model_folder, out, '--class-names', str(names), '--eval-interval', '0', '--amp',
                  '--grad-checkpointing') == 0
    text = capsys.readouterr().out
    assert 'classifiers start from random weights' in text and 'aux_weight' in text
    assert 'amp_dtype            torch.bfloat16' in text  # autocast on CPU: bfloat16
    model = from_pretrained(str(checkpoint_folders(out)[-1]))
    assert model.classes == 5 and model.class_names[1] == 'red'


# ------------------------------------------------------------------------ ImageNet backbone weights

def _no_hub(monkeypatch, cache):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # a closed local port: nothing can be fetched
    for var in ('TWINS_TIMM_MIRROR', 'TWINS_TIMM_OFFLINE', 'HF_HUB_OFFLINE'):
        monkeypatch.delenv(var, raising=False)


def test_fresh_heads_take_timms_imagenet_weights_from_the_hf_cache(tmp_path, hf_cache, monkeypatch):
    import timm
    from safetensors.torch import save_file

    from twins_timm.train import build_model
    src = timm.create_model('twins_svt_small', device='meta').to_empty(device='cpu')
    sd = {k: torch.randn(v.shape) for k, v in src.state_dict().items()}  # a classifier: head and norm too
    (tmp_path / 'repo').mkdir()
    save_file(sd, str(tmp_path / 'repo' / 'model.safetensors'))
    (tmp_path / 'repo' / 'config.json').write_text('{"architecture": "twins_svt_small"}')
    hf_cache(tmp_path / 'hub', 'timm/twins_svt_small.in1k', tmp_path / 'repo')
    _no_hub(monkeypatch, tmp_path / 'hub')
    model, source = build_model('upernet:twins_svt_small', classes=3)
    backbone = model.encoder.model.state_dict()
    from_file = [k for k in backbone if not k.startswith('stage_norms.')]  # mmseg's SVT stage norms are new
    assert len(from_file) > 100 and all(torch.equal(backbone[k], sd[k]) for k in from_file)
    assert 'timm ImageNet' in source


def test_imagenet_weights_out_of_reach_fail_at_once_with_what_to_do(tmp_path, monkeypatch):
    from twins_timm import zoo
    from twins_timm.train import build_model
    _no_hub(monkeypatch, tmp_path / 'empty')
    with pytest.raises(zoo.ZooError, match=r'twins_pcpvt_small.in1k: not in the local Hugging Face cache, and '
                                           r'127.0.0.1:9 cannot be reached.*hf download.*--from-scratch'):
        build_model('fpn:twins_pcpvt_small', classes=3)

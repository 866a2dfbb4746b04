"""The training loop: mmseg's recipe, one process or many (torchrun), checkpoints you can resume.

OUT/
  run.json                 settings of the run (recipe, batch, processes, data)
  metrics.jsonl            one JSON line per log interval (loss, lr) and per evaluation (mIoU_percent, ...:
                           percent with 2 decimals, as printed)
  checkpoints/iter_N/      save_pretrained folder (config.json, model.safetensors) + training_state.pt
                           (optimizer, scheduler, RNG, sampler position) + recipe.json
  last_checkpoint          name of the newest complete checkpoint
  best/                    save_pretrained folder of the best mIoU so far (+ recipe.json, metrics.json)

Every folder is written to a hidden temporary sibling and renamed into place, so a kill at any
moment leaves only complete checkpoints; ``resume=True`` continues from the newest one and, on CPU,
ends with the weights of an uninterrupted run (per-image augmentation seeds, saved RNG states).
A damaged newest checkpoint is passed over for the newest readable one; the run's recipe is the
checkpoint's, and options that contradict it (or a model of another shape) are refused.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from twins_timm.convert.io import atomic_path, write_folder
from twins_timm.inference import distributed
from twins_timm.inference.devices import pick_device
from .data import DatasetError, SegmentationFolder, check_label_convention, check_pairs, find_pairs
from .models import head_of
from .recipe import Recipe, build_optimizer, check_settings, recipe_for
from .resume import check_same_model, newest_readable, resumed_recipe
from .transforms import min_crop_size, train_transform

CHECKPOINTS = 'checkpoints'
STATE_FILE = 'training_state.pt'
RECIPE_FILE = 'recipe.json'
RUN_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'
LAST_FILE = 'last_checkpoint'
_CKPT_RE = re.compile(r'^iter_(\d+)$')


class RunFolderError(OSError):
    """--out cannot be used (not writable, or holds something else)."""


@dataclass
class FitResult:
    out: Path
    iters: int
    miou: Optional[float] = None          # last evaluation, in [0, 1]
    best_miou: Optional[float] = None
    best_iter: Optional[int] = None
    last_checkpoint: Optional[Path] = None
    losses: List[Tuple[int, float]] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- sampling

class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled per epoch, sharded round-robin) that can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=False)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _batches(dataset: SegmentationFolder, sampler: ResumableSampler, batch_size: int, workers: int,
             start: int, pin: bool, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches of this process, starting after ``start`` already consumed ones."""
    per_epoch = sampler.num_samples // batch_size
    m = start
    while True:
        epoch, offset = divmod(m, per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = offset * batch_size
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=workers, pin_memory=pin,
                            generator=torch.Generator().manual_seed(seed + epoch))
        for x, y in loader:
            yield x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)
            m += 1


# ----------------------------------------------------------------------------- agreement

def _agreed(ctx: distributed.Dist, fn: Callable[[], Any], everyone: bool = False) -> Any:
    """Run ``fn`` (on rank 0, or on every rank) and raise its user error on every rank alike."""
    result, err, local = None, None, None
    if everyone or ctx.main:
        try:
            result = fn()
        except (ValueError, OSError) as e:
            err, local = (isinstance(e, OSError), str(e)), e
    errors = distributed.gather([err] if err else [], ctx)
    if local is not None:
        raise local
    if errors:
        is_os, msg = errors[0]
        raise (RunFolderError if is_os else DatasetError)(msg)
    return result


# ----------------------------------------------------------------------------- run folder

def checkpoint_folders(out: Path) -> List[Path]:
    """Complete checkpoints in ``out``, oldest first (temporary partial folders are hidden names)."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CKPT_RE.match(p.name))
             and (p / STATE_FILE).is_file() and (p / 'config.json').is_file()]
    return [p for _, p in sorted(found)]


def check_out(out: Path, resume: bool) -> None:
    """Refuse an ``out`` that cannot hold this run, without creating anything."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunFolderError('--out %s is a file, not a folder' % out)
    parent = out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunFolderError('--out %s is not writable (%s is %s); choose a folder you can write to' % (
            out, parent, 'not a folder' if not parent.is_dir() else 'read-only'))
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if contents and not resume:
        raise RunFolderError(
            '--out %s already holds %s (%s); nothing was overwritten. Pass --resume to continue the run '
            'in it, or choose another --out folder.' % (
                out, 'a training run' if RUN_FILE in contents else 'files', ', '.join(contents[:3])))
    if contents and resume and RUN_FILE not in contents:
        raise RunFolderError('--out %s holds files (%s) but no twins-timm training run (%s); --resume '
                             'needs the --out of an earlier `twins-timm train`' % (out, ', '.join(contents[:3]),
                                                                                  RUN_FILE))


def prepare_out(out: Path, resume: bool) -> Optional[Path]:
    """Check ``out`` (see :func:`check_out`), create it and probe a write.
    Returns the checkpoint to resume from (None: start fresh)."""
    check_out(out, resume)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ('.write-test-%d' % os.getpid())
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as e:
        raise RunFolderError('--out %s is not writable (%s); choose a folder you can write to'
                             % (out, e.strerror or e.__class__.__name__)) from None
    ckpts = checkpoint_folders(out)
    return ckpts[-1] if (resume and ckpts) else None


def _write_json_atomic(path: Path, payload: Any) -> None:
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def _trim_metrics(path: Path, upto: int) -> None:
    """Keep the metric lines of iterations <= ``upto`` (a killed run may have logged past its last save)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get('iter', 0) <= upto:
            keep.append(line)
    if not keep:  # (an empty file is not a write atomic_path accepts)
        path.unlink()
        return
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(''.join(l + '\n' for l in keep))


# ----------------------------------------------------------------------------- checkpoints

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _save_model_folder(model: nn.Module, folder: Path, recipe: Recipe, extra: Optional[Dict] = None) -> None:
    model.save_pretrained(str(folder))
    (folder / RECIPE_FILE).write_text(json.dumps(dict(recipe=recipe.to_dict(), **(extra or {})), indent=2))


def save_checkpoint(out: Path, it: int, model: nn.Module, state: Dict[str, Any], recipe: Recipe,
                    extra: Dict[str, Any]) -> Path:
    """Write checkpoints/iter_<it>/ atomically, then point last_checkpoint at it."""
    def fill(tmp: Path) -> None:
        _save_model_folder(model, tmp, recipe, extra)
        torch.save(state, tmp / STATE_FILE)

    dst = out / CHECKPOINTS / ('iter_%06d' % it)
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    write_folder(dst, fill, force=True)
    with atomic_path(out / LAST_FILE, force=True) as tmp:
        tmp.write_text('%s/%s\n' % (CHECKPOINTS, dst.name))
    return dst


def load_training_state(folder: Path) -> Dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location='cpu', weights_only=True)


def read_checkpoint(folder: Path) -> Dict[str, Any]:
    """The recipe.json of checkpoint ``folder``, once every file of it has read back whole (raises if not)."""
    from safetensors.torch import load_file
    meta = json.loads((folder / RECIPE_FILE).read_text())
    Recipe.from_dict(meta['recipe'])
    json.loads((folder / 'config.json').read_text())
    load_training_state(folder)
    load_file(str(folder / 'model.safetensors'))
    return meta


# ----------------------------------------------------------------------------- evaluation

def percent(summary: Dict[str, float]) -> Dict[str, float]:
    """Metrics as the files store them: percent with 2 decimals, as printed (mmseg's tables), named so."""
    return {'%s_percent' % k: round(100 * v, 2) for k, v in summary.items()}


def evaluate_sharded(model: nn.Module, pairs: Sequence, num_classes: int, ctx: distributed.Dist,
                     scale: Tuple[int, int], device, reduce_zero: bool, progress: bool = False):
    """mmseg's whole-image test (keep-ratio resize to ``scale``, the recipe's (4 crop, crop)) on this
    process's share of ``pairs``; per-class areas summed exactly over the processes."""
    from twins_timm.inference.metrics import evaluate
    from twins_timm.inference.predict import InferenceSettings
    settings = InferenceSettings(scale=tuple(scale))
    was_training = model.training
    model.eval()
    try:
        acc = evaluate(model, distributed.shard(pairs, ctx), settings, num_classes, device=device,
                       reduce_zero=reduce_zero, progress=progress)
    finally:
        model.train(was_training)
    acc.sum_over_processes(ctx)
    return acc


# ----------------------------------------------------------------------------- fit

def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def fit(model: nn.Module, data: os.PathLike, out: os.PathLike, *, recipe: Optional[Recipe] = None,
        iters: Optional[int] = None, batch_size: int = 2, global_batch: Optional[int] = None,
        crop_size: Optional[int] = None, lr: Optional[float] = None, save_interval: Optional[int] = None,
        eval_interval: Optional[int] = None, log_interval: Optional[int] = None, resume: bool = False,
        amp: bool = False, grad_checkpointing: bool = False, workers: int = 2,
        reduce_zero_label: bool = True, device=None, seed: Optional[int] = None, progress: bool = True,
        train_split: str = 'training', val_split: str = 'validation',
        log: Callable[[str], None] = print, extra_settings: Optional[Dict[str, Any]] = None) -> FitResult:
    """Fine-tune a TwinsUPerNet / TwinsFPN on an ADE20K-layout folder with mmseg's recipe.

    ``recipe`` defaults to :func:`recipe_for` the model's head and backbone, overridden by ``iters``,
    ``crop_size``, ``lr``, ``global_batch`` and ``seed`` (None: the default; with ``resume``, the
    run's own recipe, which these may repeat but not change); ``batch_size`` is per process and the global batch is
    reached by gradient accumulation.  Under torchrun this runs DistributedDataParallel with
    SyncBatchNorm.  ``eval_interval=0`` skips evaluation (no validation split needed).
    Everything is checked (data, labels, ``out``) before the first step; errors are ValueError /
    OSError subclasses with one-paragraph messages.
    """
    # (recipe_for checks iters, lr and global_batch)
    check_settings(batch_size=batch_size, save_interval=save_interval, eval_interval=eval_interval,
                   log_interval=log_interval, workers=workers)
    out = Path(out)
    dev = pick_device(device)
    ctx = distributed.init(dev.type)
    dev = distributed.device_for(ctx, dev)
    main_log = log if ctx.main else (lambda msg: None)

    head = head_of(model)
    point = None
    if resume:  # the newest readable checkpoint, read on the main process (its recipe is the run's)
        point = _agreed(ctx, lambda: newest_readable(checkpoint_folders(out), read_checkpoint, main_log))
        point = distributed.gather([point] if ctx.main else [], ctx)[0]
    if point is not None:
        recipe = resumed_recipe(point[1], point[0], dict(iters=iters, crop_size=crop_size, lr=lr,
                                                         global_batch=global_batch, seed=seed),
                                recipe, reduce_zero_label)
        check_same_model(model, point[0], point[1])
    elif recipe is None:
        recipe = recipe_for(head, model.encoder_name, iters=iters, crop_size=crop_size, lr=lr,
                            global_batch=global_batch, seed=0 if seed is None else seed)
    model.test_scale = tuple(recipe.scale)  # saved with every checkpoint: eval and segment test at it
    if recipe.crop_size < min_crop_size():
        raise ValueError('--crop-size %d is too small: the Twins backbone needs at least %d pixels'
                         % (recipe.crop_size, min_crop_size()))
    per_step = batch_size * ctx.world
    if recipe.global_batch % per_step:
        raise ValueError('the global batch of %d images cannot be split into %d process(es) x --batch-size %d '
                         'x whole accumulation steps; choose a batch size that divides %d (or set the global '
                         'batch)' % (recipe.global_batch, ctx.world, batch_size, recipe.global_batch // ctx.world
                                     or recipe.global_batch))
    accum = recipe.global_batch // per_step
    config_interval = min(16000 if head == 'upernet' else 8000, recipe.iters)  # mmseg's ckpt / val interval
    save_interval = save_interval or config_interval
    eval_interval = config_interval if eval_interval is None else eval_interval
    log_interval = log_interval or min(50, recipe.iters)
    num_classes = model.classes

    # -------- everything checked before the first step
    def find():
        t = find_pairs(data, train_split)
        v = find_pairs(data, val_split) if eval_interval else []
        return t, v
    train_pairs, val_pairs = _agreed(ctx, find, everyone=True)
    report = lambda items: distributed.gather(items, ctx)  # noqa: E731
    labels = check_pairs(distributed.shard(train_pairs, ctx), num_classes, reduce_zero_label, progress=progress
                         and ctx.main, what='%s' % train_split, report=report)
    if val_pairs:
        labels += check_pairs(distributed.shard(val_pairs, ctx), num_classes, reduce_zero_label, progress=progress
                              and ctx.main, what='%s' % val_split, report=report)
    check_label_convention(labels, num_classes, reduce_zero_label)
    if len(train_pairs) < per_step:
        raise DatasetError('%d training image(s) cannot fill one step of %d process(es) x --batch-size %d; '
                           'lower --batch-size' % (len(train_pairs), ctx.world, batch_size))
    _agreed(ctx, lambda: prepare_out(out, resume))
    resume_from = point[0] if point is not None else None

    # -------- model, optimizer
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(dev)
    if ctx.active:
        from .syncbn import convert_sync_batchnorm
        model = convert_sync_batchnorm(model, dev.type)
    optimizer, scheduler = build_optimizer(model, recipe)
    use_amp = bool(amp) and dev.type in ('cuda', 'cpu')
    amp_dtype = _amp_dtype(dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=use_amp and amp_dtype == torch.float16)
    start, best = 0, dict(miou=None, iter=None)
    if resume_from is not None:
        state = load_training_state(resume_from)
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(resume_from / 'model.safetensors')))
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if 'scaler' in state and scaler.is_enabled():
            scaler.load_state_dict(state['scaler'])
        start = int(state['iter'])
        best = dict(state.get('best') or best)
        rng = state.get('rng') or []
        if ctx.rank < len(rng):
            torch.set_rng_state(rng[ctx.rank]['cpu'])
            if dev.type == 'cuda' and rng[ctx.rank].get('cuda') is not None:
                torch.cuda.set_rng_state(rng[ctx.rank]['cuda'], dev)
        if int(state.get('world', ctx.world)) != ctx.world:
            main_log('note: resuming a %d-process run with %d processes: the data order and random state '
                     'differ from an uninterrupted run' % (state['world'], ctx.world))
    ddp = None
    if ctx.active:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == 'cuda' else None)
    net = ddp or model

    dataset = SegmentationFolder(train_pairs, train_transform(
        recipe.crop_size, model.mean, model.std, recipe.scale, recipe.ratio_range, recipe.cat_max_ratio,
        recipe.flip_prob, recipe.photometric), reduce_zero=reduce_zero_label, seed=recipe.seed)
    sampler = ResumableSampler(dataset, ctx.world, ctx.rank, recipe.seed)
    if sampler.num_samples < batch_size:
        raise DatasetError('each process gets %d training image(s), fewer than --batch-size %d'
                           % (sampler.num_samples, batch_size))
    stream = _batches(dataset, sampler, batch_size, workers, start * accum, dev.type == 'cuda', recipe.seed)

    settings = dict(recipe=recipe.to_dict(), processes=ctx.world, batch_per_process=batch_size,
                    accumulation_steps=accum, device=str(dev), amp=bool(use_amp), amp_dtype=str(amp_dtype)
                    if use_amp else None, grad_checkpointing=grad_checkpointing, workers=workers,
                    data=str(data), train_images=len(train_pairs), val_images=len(val_pairs),
                    classes=num_classes, reduce_zero_label=reduce_zero_label, save_interval=save_interval,
                    eval_interval=eval_interval, log_interval=log_interval, sync_bn=ctx.active,
                    **(extra_settings or {}))
    main_log('Training %s (%s) for %d iterations from %s\nsettings (mmseg %s):\n%s\n%s' % (
        type(model).__name__, recipe.encoder, recipe.iters,
        'iteration %d of %s' % (start, resume_from) if resume_from else 'the start', recipe.config,
        recipe.describe(), '\n'.join('  %-20s %s' % (k, v) for k, v in settings.items() if k != 'recipe')))
    if ctx.main:
        if resume_from is None and not (out / RUN_FILE).exists():
            _write_json_atomic(out / RUN_FILE, settings)
        _trim_metrics(out / METRICS_FILE, start)
    metrics_path = out / METRICS_FILE

    def write_metrics(rec: Dict[str, Any]) -> None:
        if ctx.main:
            with open(metrics_path, 'a') as f:
                f.write(json.dumps(rec) + '\n')

    result = FitResult(out=out, iters=recipe.iters, best_miou=best['miou'], best_iter=best['iter'],
                       last_checkpoint=resume_from)
    autocast = (lambda: torch.autocast(dev.type, dtype=amp_dtype)) if use_amp else contextlib.nullcontext
    from tqdm import tqdm
    bar = tqdm(total=recipe.iters, initial=start, unit='it', disable=not (progress and ctx.main),
               file=sys.stderr, dynamic_ncols=True)
    weights = (1.0, recipe.aux_weight)
    from twins_timm.adapters import mmseg_loss
    net.train()
    interval_loss, interval_n, t0 = torch.zeros((), dtype=torch.float64), 0, time.time()
    for it in range(start, recipe.iters):
        step_loss = 0.0
        for k in range(accum):
            x, y = next(stream)
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            sync = ddp.no_sync() if (ddp is not None and k < accum - 1) else contextlib.nullcontext()
            with sync:
                with autocast():
                    loss = mmseg_loss(net(x), y, weights=weights) / accum
                scaler.scale(loss).backward()
            step_loss += float(loss.detach())
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_now = optimizer.param_groups[0]['lr']
        scheduler.step()
        if not math.isfinite(step_loss):
            raise FloatingPointError('the loss became %s at iteration %d; lower --lr or drop --amp'
                                     % (step_loss, it + 1))
        interval_loss += step_loss
        interval_n += 1
        done = it + 1
        bar.update(1)
        bar.set_postfix(loss='%.4f' % step_loss, lr='%.3g' % lr_now, refresh=False)
        if done % log_interval == 0 or done == recipe.iters:
            total = interval_loss.clone()
            if ctx.active:
                import torch.distributed as dist
                dist.all_reduce(total)
                total /= ctx.world
            mean_loss = float(total) / interval_n
            result.losses.append((done, mean_loss))
            write_metrics(dict(iter=done, loss=mean_loss, lr=lr_now, time=round(time.time() - t0, 3)))
            interval_loss.zero_()
            interval_n = 0
        if val_pairs and (done % eval_interval == 0 or done == recipe.iters):
            acc = evaluate_sharded(model, val_pairs, num_classes, ctx, recipe.scale, dev,
                                   reduce_zero_label)
            try:
                summary = acc.summary()
            except ValueError:
                summary = dict(mIoU=float('nan'), aAcc=float('nan'), mAcc=float('nan'))
            result.miou = summary['mIoU']
            result.evals.append(dict(iter=done, **summary))
            write_metrics(dict(iter=done, **percent(summary), images=acc.images))
            if ctx.main:
                bar.write('iter %d: mIoU %.2f  aAcc %.2f  mAcc %.2f' % (
                    done, 100 * summary['mIoU'], 100 * summary['aAcc'], 100 * summary['mAcc']), file=sys.stderr)
            if math.isfinite(summary['mIoU']) and (best['miou'] is None or summary['mIoU'] > best['miou']):
                best = dict(miou=summary['mIoU'], iter=done)
                if ctx.main:
                                    write_folder(out / 'best', lambda tmp: _save_model_folder(
                        model, tmp, recipe, dict(iter=done, metrics=percent(summary))), force=True)
            distributed.barrier(ctx)
        if done % save_interval == 0 or done == recipe.iters:
            rng = distributed.gather([dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(dev)
                                           if dev.type == 'cuda' else None)], ctx)
            if ctx.main:
                state = dict(iter=done, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                             scaler=scaler.state_dict() if scaler.is_enabled() else {}, rng=rng,
                             world=ctx.world, best=best,
                             sampler=dict(zip(('epoch', 'batch'), divmod(done * accum, max(
                                 sampler.num_samples // batch_size, 1)))))
                result.last_checkpoint = save_checkpoint(out, done, model, state, recipe,
                                                         dict(iter=done, settings=settings))
            distributed.barrier(ctx)
    bar.close()
    result.best_miou, result.best_iter = best['miou'], best['iter']
    if ctx.main and result.miou is not None:
        log('best mIoU %.2f at iteration %s; checkpoints in %s' % (
            100 * (best['miou'] or float('nan')), best['iter'], out / CHECKPOINTS))
        log('mIoU: %.2f' % (100 * result.miou))
    return result

"""The training itself, once `fit` has checked the request: model, optimizer and data from where the run
stands (:func:`prepare_training`), then the iterations (:func:`train_loop`): a step each
(:func:`train_step`) and on their intervals the mean loss, an evaluation that keeps the best model
(:func:`evaluate_and_keep_best`) and a checkpoint (:func:`save_progress`).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from tqdm import tqdm

from twins_timm.adapters import mmseg_loss
from twins_timm.files.atomic import write_folder
from twins_timm.inference import distributed
from twins_timm.inference.metrics import IoUAccumulator, evaluate
from twins_timm.inference.predict import InferenceSettings
from .data import DatasetError, SegmentationFolder
from .recipe import Recipe, build_optimizer
from .run_folder import (METRICS_FILE, RUN_FILE, append_metrics, load_training_state, save_checkpoint,
                         save_model_folder, trim_metrics, write_json_atomic)
from .sampling import ResumableSampler, batches
from .syncbn import convert_sync_batchnorm
from .transforms import train_transform

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class FitResult:
    """What `fit` did: the mean loss per log interval, every evaluation, the best mIoU, the newest checkpoint."""
    out: Path
    iters: int
    miou: Optional[float] = None          # last evaluation, in [0, 1]
    best_miou: Optional[float] = None
    best_iter: Optional[int] = None
    last_checkpoint: Optional[Path] = None
    losses: List[Tuple[int, float]] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)


@dataclass
class RunPlan:
    """The run as settled before anything is written: the recipe and how this launch carries it out."""
    recipe: Recipe
    batch_size: int                # per process and micro-batch
    accum: int                     # micro-batches per optimizer step
    save_interval: int
    eval_interval: int             # 0: no evaluation
    log_interval: int
    resume_from: Optional[Path]    # the checkpoint folder the run continues from


@dataclass
class Training:
    """What the loop works on and where it stands; ``net`` is ``model``, DDP-wrapped under torchrun."""
    plan: RunPlan
    out: Path
    ctx: distributed.Dist
    device: torch.device
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: Optional[torch.dtype]   # None: no autocast
    start: int = 0
    best: Dict[str, Any] = field(default_factory=lambda: dict(miou=None, iter=None))
    settings: Dict[str, Any] = field(default_factory=dict)   # run.json, saved with every checkpoint
    sampler: Optional[ResumableSampler] = None

    @property
    def ddp(self) -> Optional[nn.parallel.DistributedDataParallel]:
        return self.net if isinstance(self.net, nn.parallel.DistributedDataParallel) else None

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def record(self, rec: Dict[str, Any]) -> None:
        """One line of metrics.jsonl, written by the main process only."""
        if self.ctx.main:
            append_metrics(self.out, rec)


# ----------------------------------------------------------------------------- evaluation

def percent(summary: Dict[str, float]) -> Dict[str, float]:
    """Metrics as the files store them: percent with 2 decimals, as printed (mmseg's tables), named so."""
    return {'%s_percent' % k: round(100 * v, 2) for k, v in summary.items()}


def evaluate_sharded(model: nn.Module, pairs: Sequence, num_classes: int, ctx: distributed.Dist,
                     scale: Tuple[int, int], device, reduce_zero: bool, progress: bool = False) -> IoUAccumulator:
    """mmseg's whole-image test (keep-ratio resize to ``scale``, the recipe's (4 crop, crop)) on this
    process's share of ``pairs``; per-class areas summed exactly over the processes."""
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


# ----------------------------------------------------------------------------- model, optimizer, resume

def _amp_dtype(device: torch.device) -> torch.dtype:
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def prepare_training(model: nn.Module, plan: RunPlan, out: Path, ctx: distributed.Dist, device: torch.device,
                     amp: bool, grad_checkpointing: bool, log: Callable[[str], None]) -> Training:
    """The model on its device (SyncBatchNorm under torchrun), mmseg's optimizer and schedule, the AMP scaler
    (float16 only: bfloat16 needs none); on resume all of them as the checkpoint left them; then DDP."""
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if ctx.active:
        model = convert_sync_batchnorm(model, device.type)
    optimizer, scheduler = build_optimizer(model, plan.recipe)
    use_amp = bool(amp) and device.type in ('cuda', 'cpu')
    amp_dtype = _amp_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)
    training = Training(plan=plan, out=out, ctx=ctx, device=device, model=model, net=model, optimizer=optimizer,
                        scheduler=scheduler, scaler=scaler, amp_dtype=amp_dtype if use_amp else None)
    if plan.resume_from is not None:
        restore(training, plan.resume_from, log)
    if ctx.active:
        training.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    return training


def restore(training: Training, folder: Path, log: Callable[[str], None]) -> None:
    """Weights, optimizer, schedule, scaler, RNG, iteration and best mIoU as ``folder`` saved them, so the
    run goes on as if it had never stopped (on as many processes as before)."""
    t, ctx = training, training.ctx
    state = load_training_state(folder)
    t.model.load_state_dict(load_file(str(folder / 'model.safetensors')))
    t.optimizer.load_state_dict(state['optimizer'])
    t.scheduler.load_state_dict(state['scheduler'])
    if 'scaler' in state and t.scaler.is_enabled():
        t.scaler.load_state_dict(state['scaler'])
    t.start = int(state['iter'])
    t.best = dict(state.get('best') or t.best)
    rng = state.get('rng') or []
    if ctx.rank < len(rng):
        torch.set_rng_state(rng[ctx.rank]['cpu'])
        if t.device.type == 'cuda' and rng[ctx.rank].get('cuda') is not None:
            torch.cuda.set_rng_state(rng[ctx.rank]['cuda'], t.device)
    if int(state.get('world', ctx.world)) != ctx.world:
        log('note: resuming a %d-process run with %d processes: the data order and random state '
            'differ from an uninterrupted run' % (state['world'], ctx.world))


def data_stream(training: Training, train_pairs: Sequence, reduce_zero_label: bool, workers: int) -> Iterator[Batch]:
    """This process's endless micro-batches with mmseg's training augmentation, continued where the run
    stands (the sampler is kept on ``training``: checkpoints save its position)."""
    t, recipe = training, training.plan.recipe
    dataset = SegmentationFolder(train_pairs, train_transform(
        recipe.crop_size, t.model.mean, t.model.std, recipe.scale, recipe.ratio_range, recipe.cat_max_ratio,
        recipe.flip_prob, recipe.photometric), reduce_zero=reduce_zero_label, seed=recipe.seed)
    t.sampler = ResumableSampler(dataset, t.ctx.world, t.ctx.rank, recipe.seed)
    if t.sampler.num_samples < t.plan.batch_size:
        raise DatasetError('each process gets %d training image(s), fewer than --batch-size %d'
                           % (t.sampler.num_samples, t.plan.batch_size))
    return batches(dataset, t.sampler, t.plan.batch_size, workers, t.start * t.plan.accum,
                   t.device.type == 'cuda', recipe.seed)


def start_run_folder(training: Training, settings: Dict[str, Any], log: Callable[[str], None]) -> None:
    """Say what runs; a new run writes run.json, a resumed one drops the metric lines logged after its
    checkpoint (a killed run may have logged past its last save)."""
    t, recipe = training, training.plan.recipe
    t.settings = settings
    resume_from = t.plan.resume_from
    log('Training %s (%s) for %d iterations from %s\nsettings (mmseg %s):\n%s\n%s' % (
        type(t.model).__name__, recipe.encoder, recipe.iters,
        'iteration %d of %s' % (t.start, resume_from) if resume_from else 'the start', recipe.config,
        recipe.describe(), '\n'.join('  %-20s %s' % (k, v) for k, v in settings.items() if k != 'recipe')))
    if t.ctx.main:
        if resume_from is None and not (t.out / RUN_FILE).exists():
            write_json_atomic(t.out / RUN_FILE, settings)
        trim_metrics(t.out / METRICS_FILE, t.start)


# ----------------------------------------------------------------------------- the loop

def train_step(training: Training, stream: Iterator[Batch], it: int) -> Tuple[float, float]:
    """One optimizer step over the global batch: ``accum`` micro-batches whose gradients DDP synchronises only
    on the last; (the step's loss, the learning rate it was taken at)."""
    t, accum = training, training.plan.accum
    weights = (1.0, t.plan.recipe.aux_weight)
    ddp = t.ddp
    step_loss = 0.0
    for k in range(accum):
        x, y = next(stream)
        x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
        sync = ddp.no_sync() if (ddp is not None and k < accum - 1) else contextlib.nullcontext()
        with sync:
            with t.autocast():
                loss = mmseg_loss(t.net(x), y, weights=weights) / accum
            t.scaler.scale(loss).backward()
        step_loss += float(loss.detach())
    t.scaler.step(t.optimizer)
    t.scaler.update()
    t.optimizer.zero_grad(set_to_none=True)
    lr_now = t.optimizer.param_groups[0]['lr']
    t.scheduler.step()
    if not math.isfinite(step_loss):
        raise FloatingPointError('the loss became %s at iteration %d; lower --lr or drop --amp'
                                 % (step_loss, it + 1))
    return step_loss, lr_now


def mean_over_processes(total: torch.Tensor, n: int, ctx: distributed.Dist) -> float:
    """``total / n`` averaged over the processes: each summed the losses of its own images."""
    total = total.clone()
    if ctx.active:
        dist.all_reduce(total)
        total /= ctx.world
    return float(total) / n


def evaluate_and_keep_best(training: Training, result: FitResult, val_pairs: Sequence, done: int,
                           reduce_zero_label: bool, bar: tqdm) -> None:
    """mIoU on the validation split, recorded and printed; a new best mIoU replaces OUT/best/."""
    t, recipe = training, training.plan.recipe
    acc = evaluate_sharded(t.model, val_pairs, t.model.classes, t.ctx, recipe.scale, t.device, reduce_zero_label)
    try:
        summary = acc.summary()
    except ValueError:
        summary = dict(mIoU=float('nan'), aAcc=float('nan'), mAcc=float('nan'))
    result.miou = summary['mIoU']
    result.evals.append(dict(iter=done, **summary))
    t.record(dict(iter=done, **percent(summary), images=acc.images))
    if t.ctx.main:
        bar.write('iter %d: mIoU %.2f  aAcc %.2f  mAcc %.2f' % (
            done, 100 * summary['mIoU'], 100 * summary['aAcc'], 100 * summary['mAcc']), file=sys.stderr)
    if math.isfinite(summary['mIoU']) and (t.best['miou'] is None or summary['mIoU'] > t.best['miou']):
        t.best = dict(miou=summary['mIoU'], iter=done)
        if t.ctx.main:
            write_folder(t.out / 'best', lambda tmp: save_model_folder(
                t.model, tmp, recipe, dict(iter=done, metrics=percent(summary))), force=True)
    distributed.barrier(t.ctx)


def save_progress(training: Training, result: FitResult, done: int) -> None:
    """A checkpoint of everything a resume needs: weights, optimizer, schedule, scaler, every process's RNG,
    the best mIoU and the sampler's place in its epoch."""
    t, ctx = training, training.ctx
    rng = distributed.gather([dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(t.device)
                                   if t.device.type == 'cuda' else None)], ctx)
    if ctx.main:
        per_epoch = max(t.sampler.num_samples // t.plan.batch_size, 1)
        state = dict(iter=done, optimizer=t.optimizer.state_dict(), scheduler=t.scheduler.state_dict(),
                     scaler=t.scaler.state_dict() if t.scaler.is_enabled() else {}, rng=rng,
                     world=ctx.world, best=t.best,
                     sampler=dict(zip(('epoch', 'batch'), divmod(done * t.plan.accum, per_epoch))))
        result.last_checkpoint = save_checkpoint(t.out, done, t.model, state, t.plan.recipe,
                                                 dict(iter=done, settings=t.settings))
    distributed.barrier(ctx)


def train_loop(training: Training, result: FitResult, stream: Iterator[Batch], val_pairs: Sequence,
               reduce_zero_label: bool, progress: bool) -> None:
    """The iterations from where the run stands to the recipe's last: a step each, and on their intervals
    (and at the end) the mean loss, an evaluation and a checkpoint."""
    t, plan = training, training.plan
    iters = plan.recipe.iters
    bar = tqdm(total=iters, initial=t.start, unit='it', disable=not (progress and t.ctx.main),
               file=sys.stderr, dynamic_ncols=True)
    t.net.train()
    interval_loss, interval_n, t0 = torch.zeros((), dtype=torch.float64), 0, time.time()
    for it in range(t.start, iters):
        step_loss, lr_now = train_step(t, stream, it)
        interval_loss += step_loss
        interval_n += 1
        done = it + 1
        bar.update(1)
        bar.set_postfix(loss='%.4f' % step_loss, lr='%.3g' % lr_now, refresh=False)
        if done % plan.log_interval == 0 or done == iters:
            mean_loss = mean_over_processes(interval_loss, interval_n, t.ctx)
            result.losses.append((done, mean_loss))
            t.record(dict(iter=done, loss=mean_loss, lr=lr_now, time=round(time.time() - t0, 3)))
            interval_loss.zero_()
            interval_n = 0
        if val_pairs and (done % plan.eval_interval == 0 or done == iters):
            evaluate_and_keep_best(t, result, val_pairs, done, reduce_zero_label, bar)
        if done % plan.save_interval == 0 or done == iters:
            save_progress(t, result, done)
    bar.close()

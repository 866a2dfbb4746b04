"""`fit`: mmseg's training recipe, one process or many (torchrun), checkpoints you can resume.

`fit` is its parts, in this order:
  1. the request: the recipe settled (a resumed run's own) and split into processes x batch x
     accumulation steps (:func:`settle_recipe`, :func:`plan_run`);
  2. the data: every image and label read once, before anything is written (:func:`check_data`);
  3. the run folder made (:mod:`twins_timm.train.run_folder`);
  4. the model, optimizer and scaler, as the checkpoint left them on resume, and the data stream;
  5. the loop: one optimizer step at a time, then on their intervals the mean loss, an evaluation that
     keeps the best model and a checkpoint (4 and 5: :mod:`twins_timm.train.loop`);
  6. the summary.

``resume=True`` continues from the newest checkpoint and, on CPU, ends with the weights of an
uninterrupted run (per-image augmentation seeds, saved RNG states). A damaged newest checkpoint is
passed over for the newest readable one; the run's recipe is the checkpoint's, and options that
contradict it (or a model of another shape) are refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple


from torch import nn

from twins_timm.inference import distributed
from twins_timm.inference.devices import pick_device
from .data import DatasetError, check_label_convention, check_pairs, find_pairs
from .loop import FitResult, RunPlan, data_stream, prepare_training, start_run_folder, train_loop
from .models import head_of
from .recipe import Recipe, check_settings, recipe_for
from .resume import check_same_model, newest_readable, resumed_recipe
from .run_folder import CHECKPOINTS, RunFolderError, checkpoint_folders, prepare_out, read_checkpoint
from .transforms import min_crop_size


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


# ----------------------------------------------------------------------------- 1. the request

def settle_recipe(model: nn.Module, head: str, recipe: Optional[Recipe], overrides: Dict[str, Any],
                  reduce_zero_label: bool, out: Path, resume: bool, ctx: distributed.Dist,
                  log: Callable[[str], None]) -> Tuple[Recipe, Optional[Path]]:
    """(the run's recipe, the checkpoint it resumes from): on resume the newest readable checkpoint's own
    recipe, which ``overrides`` may repeat but not change, for a model of its shape; else ``recipe``, else
    mmseg's for the model's head and backbone with ``overrides``. The checkpoint is read on the main process
    and shared, so every process continues from the same one."""
    point = None
    if resume:
        point = _agreed(ctx, lambda: newest_readable(checkpoint_folders(out), read_checkpoint, log))
        point = distributed.gather([point] if ctx.main else [], ctx)[0]
    if point is not None:
        folder, meta = point
        recipe = resumed_recipe(meta, folder, overrides, recipe, reduce_zero_label)
        check_same_model(model, folder, meta)
        return recipe, folder
    if recipe is None:
        seed = overrides['seed']
        recipe = recipe_for(head, model.encoder_name, **dict(overrides, seed=0 if seed is None else seed))
    return recipe, None


def plan_run(recipe: Recipe, head: str, batch_size: int, world: int, save_interval: Optional[int],
             eval_interval: Optional[int], log_interval: Optional[int], resume_from: Optional[Path]) -> RunPlan:
    """Check that the recipe fits this launch (the crop, the global batch as whole processes x
    ``batch_size`` x accumulation steps) and fill in mmseg's intervals for those not given."""
    if recipe.crop_size < min_crop_size():
        raise ValueError('--crop-size %d is too small: the Twins backbone needs at least %d pixels'
                         % (recipe.crop_size, min_crop_size()))
    per_step = batch_size * world
    if recipe.global_batch % per_step:
        raise ValueError('the global batch of %d images cannot be split into %d process(es) x --batch-size %d '
                         'x whole accumulation steps; choose a batch size that divides %d (or set the global '
                         'batch)' % (recipe.global_batch, world, batch_size, recipe.global_batch // world
                                     or recipe.global_batch))
    config_interval = min(16000 if head == 'upernet' else 8000, recipe.iters)  # mmseg's ckpt / val interval
    return RunPlan(recipe=recipe, batch_size=batch_size, accum=recipe.global_batch // per_step,
                   save_interval=save_interval or config_interval,
                   eval_interval=config_interval if eval_interval is None else eval_interval,
                   log_interval=log_interval or min(50, recipe.iters), resume_from=resume_from)


# ----------------------------------------------------------------------------- 2. the data

def check_data(data: os.PathLike, train_split: str, val_split: str, plan: RunPlan, num_classes: int,
               reduce_zero_label: bool, progress: bool, ctx: distributed.Dist) -> Tuple[List, List]:
    """(training pairs, validation pairs; none without evaluation), every image and label read once (each
    process its share) before the run folder is made: a bad file is an error now, not hours into the run."""
    def find():
        t = find_pairs(data, train_split)
        v = find_pairs(data, val_split) if plan.eval_interval else []
        return t, v
    train_pairs, val_pairs = _agreed(ctx, find, everyone=True)
    report = lambda items: distributed.gather(items, ctx)  # noqa: E731
    labels = check_pairs(distributed.shard(train_pairs, ctx), num_classes, reduce_zero_label, progress=progress
                         and ctx.main, what='%s' % train_split, report=report)
    if val_pairs:
        labels += check_pairs(distributed.shard(val_pairs, ctx), num_classes, reduce_zero_label, progress=progress
                              and ctx.main, what='%s' % val_split, report=report)
    check_label_convention(labels, num_classes, reduce_zero_label)
    if len(train_pairs) < plan.batch_size * ctx.world:
        raise DatasetError('%d training image(s) cannot fill one step of %d process(es) x --batch-size %d; '
                           'lower --batch-size' % (len(train_pairs), ctx.world, plan.batch_size))
    return train_pairs, val_pairs


# ----------------------------------------------------------------------------- fit

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

    # 1. the request
    head = head_of(model)
    overrides = dict(iters=iters, crop_size=crop_size, lr=lr, global_batch=global_batch, seed=seed)
    recipe, resume_from = settle_recipe(model, head, recipe, overrides, reduce_zero_label, out, resume, ctx,
                                        main_log)
    model.test_scale = tuple(recipe.scale)  # saved with every checkpoint: eval and segment test at it
    plan = plan_run(recipe, head, batch_size, ctx.world, save_interval, eval_interval, log_interval, resume_from)
    # 2. the data, 3. the run folder: everything checked before the first step
    train_pairs, val_pairs = check_data(data, train_split, val_split, plan, model.classes, reduce_zero_label,
                                        progress, ctx)
    _agreed(ctx, lambda: prepare_out(out, resume))
    # 4. model, optimizer, data stream, from where the run stands
    training = prepare_training(model, plan, out, ctx, dev, amp, grad_checkpointing, main_log)
    stream = data_stream(training, train_pairs, reduce_zero_label, workers)
    start_run_folder(training, dict(
        recipe=recipe.to_dict(), processes=ctx.world, batch_per_process=batch_size,
        accumulation_steps=plan.accum, device=str(dev), amp=training.amp_dtype is not None,
        amp_dtype=str(training.amp_dtype) if training.amp_dtype else None, grad_checkpointing=grad_checkpointing,
        workers=workers, data=str(data), train_images=len(train_pairs), val_images=len(val_pairs),
        classes=model.classes, reduce_zero_label=reduce_zero_label, save_interval=plan.save_interval,
        eval_interval=plan.eval_interval, log_interval=plan.log_interval, sync_bn=ctx.active,
        **(extra_settings or {})), main_log)
    # 5. the loop
    result = FitResult(out=out, iters=recipe.iters, best_miou=training.best['miou'],
                       best_iter=training.best['iter'], last_checkpoint=resume_from)
    train_loop(training, result, stream, val_pairs, reduce_zero_label, progress)
    # 6. the summary
    best = training.best
    result.best_miou, result.best_iter = best['miou'], best['iter']
    if ctx.main and result.miou is not None:
        log('best mIoU %.2f at iteration %s; checkpoints in %s' % (
            100 * (best['miou'] or float('nan')), best['iter'], out / CHECKPOINTS))
        log('mIoU: %.2f' % (100 * result.miou))
    return result

"""mmseg's Twins ADE20K training recipe, as data, and the optimizer / schedule built from it.

Values from mmsegmentation 1.2.2's configs (``mmseg/.mim/configs``):

UPerNet (twins/twins_*_uperhead_8xb{4,2}-160k_ade20k-512x512.py, _base_/models/twins_pcpvt-s_upernet.py)
  AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01; paramwise_cfg custom_keys 'pos_block' and
  'norm' with decay_mult 0 (substring match on parameter names, as mmengine does);
  LinearLR start_factor 1e-6 for 1500 iterations, then PolyLR power 1.0, eta_min 0 to 160k;
  global batch 8x4 (pcpvt-s) or 8x2 (the others); aux FCNHead loss weight 0.4.
FPN (twins/twins_*_fpn_fpnhead_8xb4-80k_ade20k-512x512.py, _base_/schedules/schedule_80k.py)
  AdamW lr 1e-4, weight decay 1e-4 on every parameter (no paramwise_cfg), no warm-up,
  PolyLR power 0.9 with eta_min 1e-4 to 80k (eta_min equals the lr: the schedule is flat, as in
  the config); global batch 8x4; no auxiliary head.
Backbone drop_path_rate: 0.3 for pcpvt-b/-l UPerNet and svt-l, 0.2 otherwise.
Data (_base_/datasets/ade20k.py): RandomResize (2048, 512) x (0.5, 2.0), RandomCrop 512 with
cat_max_ratio 0.75, RandomFlip 0.5, PhotoMetricDistortion; crop c uses scale (4c, c).

A shorter run (``iters`` below the config's) keeps the schedule's shape: the warm-up is the same
fraction of the run.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from twins_timm.adapters.hub import HEADS
from twins_timm.models.twins import VARIANTS


@dataclass
class Recipe:
    """Every training setting; printed at the start and stored with each checkpoint."""
    head: str
    encoder: str
    config: str                      # the mmseg config the defaults come from
    lr: float
    weight_decay: float
    betas: Tuple[float, float] = (0.9, 0.999)
    no_decay_keys: Tuple[str, ...] = ()
    warmup_iters: int = 0
    warmup_start_factor: float = 1e-6
    poly_power: float = 1.0
    eta_min: float = 0.0
    iters: int = 160000
    global_batch: int = 16
    crop_size: int = 512
    scale: Tuple[int, int] = (2048, 512)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    aux_weight: float = 0.4
    drop_path_rate: float = 0.2
    seed: int = 0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'Recipe':
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**d)

    def describe(self) -> str:
        return '\n'.join('  %-20s %s' % (k, v) for k, v in self.to_dict().items())


def _short(encoder: str) -> str:
    arch, size = encoder.split('_')[1:3]
    return '%s-%s' % (arch, size[0])


def check_settings(iters: Optional[int] = None, lr: Optional[float] = None, global_batch: Optional[int] = None,
                   batch_size: int = 1, save_interval: Optional[int] = None, eval_interval: Optional[int] = None,
                   log_interval: Optional[int] = None, workers: int = 0,
                   drop_path_rate: Optional[float] = None) -> None:
    """The ranges of the user-given training numbers (None: the recipe's default), in one place: ``fit``
    checks them, and ``twins-timm train`` before it loads (or downloads) a model."""
    wrong = [text for bad, text in (
        (iters is not None and iters < 1, '--iters must be at least 1'),
        (lr is not None and not lr > 0, '--lr must be positive'),
        (global_batch is not None and global_batch < 1, '--global-batch must be at least 1'),
        (batch_size < 1, '--batch-size must be at least 1'),
        (save_interval is not None and save_interval < 1, '--save-interval must be at least 1'),
        (eval_interval is not None and eval_interval < 0, '--eval-interval must be at least 0 (0: never)'),
        (log_interval is not None and log_interval < 1, '--log-interval must be at least 1'),
        (workers < 0, '--workers must be at least 0'),
        (drop_path_rate is not None and not 0 <= drop_path_rate < 1, '--drop-path-rate must be in [0, 1)'),
    ) if bad]
    if wrong:
        raise ValueError('; '.join(wrong))


def recipe_for(head: str, encoder: str, *, iters: Optional[int] = None, crop_size: Optional[int] = None,
               lr: Optional[float] = None, global_batch: Optional[int] = None, **overrides: Any) -> Recipe:
    """mmseg's recipe for ``head`` ('upernet' / 'fpn') on ``encoder``, with the given overrides."""
    if head not in HEADS:
        raise ValueError('unknown head %r; choose one of %s' % (head, ', '.join(HEADS)))
    if encoder not in VARIANTS:
        raise ValueError('unknown Twins variant %r; choose one of %s' % (encoder, ', '.join(VARIANTS)))
    short = _short(encoder)
    big = short in ('pcpvt-b', 'pcpvt-l') and head == 'upernet' or short == 'svt-l'
    if head == 'upernet':
        per_gpu = 4 if short == 'pcpvt-s' else 2
        r = Recipe(head, encoder, 'twins_%s_uperhead_8xb%d-160k_ade20k-512x512.py' % (short, per_gpu),
                   lr=6e-5, weight_decay=0.01, no_decay_keys=('pos_block', 'norm'),
                   warmup_iters=1500, poly_power=1.0, eta_min=0.0, iters=160000,
                   global_batch=8 * per_gpu, aux_weight=0.4)
    else:
        r = Recipe(head, encoder, 'twins_%s_fpn_fpnhead_8xb4-80k_ade20k-512x512.py' % short,
                   lr=1e-4, weight_decay=1e-4, warmup_iters=0, poly_power=0.9, eta_min=1e-4,
                   iters=80000, global_batch=32, aux_weight=0.4)
    r.drop_path_rate = 0.3 if big else 0.2
    check_settings(iters=iters, lr=lr, global_batch=global_batch)
    if iters is not None:
        r.warmup_iters = round(r.warmup_iters * iters / r.iters)
        r.iters = iters
    if crop_size is not None:
        r.crop_size = crop_size
        r.scale = (4 * crop_size, crop_size)
    if lr is not None:
        r.lr = lr
    if global_batch is not None:
        r.global_batch = global_batch
    for k, v in overrides.items():
        if not hasattr(r, k):
            raise TypeError('unknown recipe setting %r' % k)
        setattr(r, k, v)
    return r


def param_groups(model, recipe: Recipe) -> List[Dict[str, Any]]:
    """Two AdamW groups as mmengine's paramwise_cfg builds them: names containing a no-decay key
    get weight decay 0, every other trainable parameter the recipe's."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(k in name for k in recipe.no_decay_keys) else decay).append(p)
    groups = [dict(params=decay, weight_decay=recipe.weight_decay)]
    if no_decay:
        groups.append(dict(params=no_decay, weight_decay=0.0))
    return groups


def lr_factor(recipe: Recipe, step: int) -> float:
    """Multiplier of the base lr at optimizer step ``step``: mmengine's LinearLR (start_factor at
    step 0, 1 at the warm-up's last step) then PolyLR (the lr at the run's last step is eta_min)."""
    warm = recipe.warmup_iters
    if step < warm:
        span = warm - 1  # mmengine: total_iters = end - begin - 1
        return recipe.warmup_start_factor + (1 - recipe.warmup_start_factor) * (step / span if span else 0.0)
    span = recipe.iters - warm - 1
    t = min(max(step - warm, 0), max(span, 0))
    floor = recipe.eta_min / recipe.lr
    return (1 - floor) * ((span - t) / span if span > 0 else 1.0) ** recipe.poly_power + floor


def build_optimizer(model, recipe: Recipe):
    """AdamW over :func:`param_groups` and a LambdaLR following :func:`lr_factor`."""
    import torch
    optimizer = torch.optim.AdamW(param_groups(model, recipe), lr=recipe.lr, betas=tuple(recipe.betas),
                                  weight_decay=recipe.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(recipe, step))
    return optimizer, scheduler


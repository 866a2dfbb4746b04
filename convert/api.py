"""Python API of the converter; the command line (``cli.py``) is a thin shell over it.

>>> from twins_timm.convert import convert_checkpoint, build_model, save
>>> res = convert_checkpoint('alt_gvt_small.pth')          # detect + map + verify every key
>>> model = build_model(res)                                # timm model or SMP segmenter, strict load
>>> save(res, 'twins_svt_small.in1k')                       # Hub folder (config.json, model.safetensors, README)
"""
from __future__ import annotations

import contextlib
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .detect import DetectionError, detect, meta_classes, normalize_variant, unwrap
from .engine import MappingError, apply_rules
from .io import PathLike, load_file
from .rules import ENCODER_PREFIX, MMSEG_BACKBONE, PARTS, SEG_BACKBONE_PREFIX, SEG_HEADS, prefixed, table_for

SEGMENTER_TASKS = ('fpn', 'upernet')

# What a family's files hold that its target has no use for: dropped by default, always reported.
DEFAULT_DROPS = {
    # official segmentation backbones keep the ImageNet classifier and final norm, never used by the segmentor
    ('official_seg', 'fpn'): {'head': 'unused classification head of a segmentation backbone',
                              'norm': 'unused final norm of a segmentation backbone'},
    ('official_seg', 'upernet'): {'head': 'unused classification head of a segmentation backbone',
                                  'norm': 'unused final norm of a segmentation backbone'},
    ('official_seg', 'backbone'): {'head': 'unused classification head of a segmentation backbone'},
}


@dataclass
class ConversionResult:
    """A converted checkpoint: target-named tensors plus everything detected about them."""
    state_dict: Dict[str, torch.Tensor]
    format: str
    family: str
    size: str
    variant: str
    task: str
    num_classes: int
    model_args: Dict[str, Any]
    meta: Dict[str, Any] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    dropped_parts: Dict[str, str] = field(default_factory=dict)   # part -> why
    aux_head: bool = False
    source: Optional[str] = None
    wrapper: str = ''
    n_source_keys: int = 0
    n_mapped: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def is_segmenter(self) -> bool:
        return self.task in SEGMENTER_TASKS

    @property
    def n_params(self) -> int:
        return sum(v.numel() for k, v in self.state_dict.items()
                   if v.is_floating_point() and not k.endswith(('running_mean', 'running_var')))


# ------------------------------------------------------------------------------- family settings
def family_args(fmt: str, variant: str) -> Dict[str, Any]:
    """Backbone kwargs reproducing the computation of the checkpoint's family (see FORMATS.md)."""
    from twins_timm.models.twins import checkpoint_family_args

    return dict(checkpoint_family_args(fmt, variant))


def _read_folder_config(path: Path) -> Tuple[Path, Dict[str, Any]]:
    cfg_file = path / 'config.json'
    weights = path / 'model.safetensors'
    if not weights.exists() and (path / 'pytorch_model.bin').exists():  # older Hub folders
        weights = path / 'pytorch_model.bin'
    if not weights.exists():
        raise FileNotFoundError('%s is a folder without model.safetensors (or pytorch_model.bin); pass a checkpoint '
                                'file or a Hub folder written by twins-timm / timm / SMP' % path)
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    return weights, cfg


def _config_model_args(cfg: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """Backbone kwargs recorded in a timm or SMP config.json, without the generic ones."""
    if 'encoder_args' in cfg:
        return dict(cfg.get('encoder_args') or {})
    if 'model_args' in cfg:
        skip = ('num_classes', 'in_chans', 'global_pool', 'img_size', 'pretrained_cfg_overlay')
        return {k: v for k, v in cfg['model_args'].items() if k not in skip}
    return None


# ----------------------------------------------------------------------------------- the models
def make_model(variant: str, task: str, num_classes: int, model_args: Mapping[str, Any], aux_head: bool = False,
               class_names: Optional[List[str]] = None, palette: Optional[List[List[int]]] = None) -> nn.Module:
    """An (uninitialised-weights) target model of the given kind; call under ``torch.device('meta')`` for shapes."""
    import timm

    import twins_timm  # noqa: F401  registers our Twins variants

    if task in SEGMENTER_TASKS:
        try:
            from twins_timm import adapters
            cls = adapters.TwinsUPerNet if task == 'upernet' else adapters.TwinsFPN
        except (ImportError, AttributeError) as e:
            raise ImportError('the segmentation adapters (twins_timm.adapters.TwinsUPerNet / TwinsFPN) are not '
                              'available: %s' % e) from None
        kw: Dict[str, Any] = dict(encoder_name=variant, classes=num_classes, encoder_args=dict(model_args),
                                  class_names=class_names, palette=palette)
        if task == 'upernet':
            kw['aux_head'] = aux_head
        return cls(**kw)
    return timm.create_model(variant, pretrained=False, num_classes=num_classes, **dict(model_args))


def _make_for(res: ConversionResult) -> nn.Module:
    return make_model(res.variant, res.task, res.num_classes, res.model_args, res.aux_head,
                      res.meta.get('class_names'), res.meta.get('palette'))


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Build modules with every parameter and buffer moved to the meta device as it is registered.

    Unlike ``with torch.device('meta')`` this lets model code compute plain tensors (e.g.
    ``torch.linspace(...).tolist()`` for drop-path rates) while weights cost no memory or init time.
    """
    orig_param, orig_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def register_parameter(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to('meta'), requires_grad=param.requires_grad)
        orig_param(self, name, param)

    def register_buffer(self, name, tensor, persistent=True):
        if tensor is not None and not tensor.is_meta:
            tensor = tensor.to('meta')
        orig_buffer(self, name, tensor, persistent=persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = orig_param, orig_buffer


def target_shapes(variant: str, task: str, num_classes: int, model_args: Mapping[str, Any],
                  aux_head: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the target model, built with meta weights (no memory, fast even for L)."""
    return dict(_target_shapes(variant, task, num_classes, json.dumps(dict(model_args), sort_keys=True), aux_head))


@functools.lru_cache(maxsize=32)
def _target_shapes(variant: str, task: str, num_classes: int, model_args_json: str,
                   aux_head: bool) -> Tuple[Tuple[str, Tuple[int, ...]], ...]:
    with _params_on_meta():
        model = make_model(variant, task, num_classes, json.loads(model_args_json), aux_head)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _load_into(make, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build with meta weights and adopt ``state_dict``'s tensors (no random init, no copy).

    Falls back to an ordinary build + copy when the model keeps tensors outside its state dict
    (non-persistent buffers) that would otherwise stay on the meta device.
    """
    with _params_on_meta():
        model = make()
    model.load_state_dict(state_dict, strict=True, assign=True)
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        model = make()
        model.load_state_dict(state_dict, strict=True)
    return model


def build_model(res: ConversionResult, device: Union[str, torch.device] = 'cpu') -> nn.Module:
    """The target model (timm backbone/classifier or SMP segmenter) with the weights loaded strictly, in eval mode.

    The model's tensors are those of ``res.state_dict`` (not copies); clone the state dict first if
    both must be changed independently.
    """
    model = _load_into(lambda: _make_for(res), res.state_dict)
    return model.to(device).eval()


# --------------------------------------------------------------------------------- conversion
def _load_source(src: Union[PathLike, Mapping[str, Any]], progress: Optional[bool]
                 ) -> Tuple[Any, Optional[str], bool, Optional[Dict[str, Any]]]:
    """(loaded object, source name, is_safetensors, folder config) for a path, folder or mapping."""
    if isinstance(src, Mapping):
        return src, None, False, None
    path = Path(src)
    cfg = None
    if path.is_dir():
        path, cfg = _read_folder_config(path)
    elif path.suffix == '.safetensors' and (path.parent / 'config.json').exists():
        cfg = json.loads((path.parent / 'config.json').read_text())
    return load_file(path, progress=progress), str(path), path.suffix == '.safetensors', cfg


def _parse_drop(drop: Union[str, Iterable[str], None]) -> List[str]:
    if not drop:
        return []
    items = drop.split(',') if isinstance(drop, str) else [p for d in drop for p in str(d).split(',')]
    parts = [p.strip().replace('-', '_') for p in items if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError('cannot drop %s: the parts that can be dropped are %s'
                         % (', '.join(map(repr, unknown)), '; '.join('%s = %s' % kv for kv in PARTS.items())))
    return parts


def convert_checkpoint(src: Union[PathLike, Mapping[str, Any]], variant: Optional[str] = None,
                       drop: Union[str, Iterable[str], None] = (), progress: Optional[bool] = None
                       ) -> ConversionResult:
    """Read, detect and map a checkpoint onto our timm backbone or SMP segmenter names.

    ``variant`` (e.g. ``twins_svt_small`` or ``svt-s``) is checked against what the weights are.
    ``drop`` lists parts to leave out (``head``, ``norm``, ``aux_head``). Raises ValueError subclasses
    with a readable message on anything unexpected: foreign or ambiguous files, a wrong variant,
    unmapped / unfilled / misshaped keys.
    """
    obj, source, is_st, folder_cfg = _load_source(src, progress)
    sd, wrapper, meta = unwrap(obj)
    det = detect(sd, wrapper, is_safetensors=is_st)
    if variant:
        wanted = normalize_variant(variant)
        if wanted != det.variant:
            raise DetectionError('--variant %s does not match the checkpoint, which is %s (%s, depths %s, widths %s). '
                                 'Leave --variant out to use the detected one, or pick the right file.'
                                 % (wanted, det.variant, det.family.upper(), list(det.depths), list(det.widths)))

    user_drop = _parse_drop(drop)
    defaults = DEFAULT_DROPS.get((det.format, det.task), {})
    reasons = {p: 'dropped on request (--drop %s)' % p for p in user_drop}
    for p, why in defaults.items():
        reasons.setdefault(p, why + ' (dropped by default)')
    drop_set = set(reasons)

    task, num_classes, aux = det.task, det.num_classes, det.aux_head
    if 'head' in user_drop and task == 'classification':
        task, num_classes = 'backbone', 0
    if 'aux_head' in drop_set:
        aux = False
    if 'norm' in user_drop and det.task not in SEGMENTER_TASKS:
        raise ValueError('the final norm is part of the timm model; it can only be dropped when writing the '
                         'mmseg format (--to mmseg)')

    if det.format == 'timm':
        model_args = _config_model_args(folder_cfg or {})
        if model_args is None:
            model_args = family_args('timm', det.variant)
            if any('stage_norms.' in k for k in sd):
                model_args['stage_norm'] = True
                det.notes.append('no config.json next to the weights: per-stage norms inferred from the keys, '
                                 'other numerics settings are timm defaults')
    else:
        model_args = family_args(det.format, det.variant)

    class_names, palette = meta_classes(meta)
    info: Dict[str, Any] = {}
    if det.task in SEGMENTER_TASKS:
        if folder_cfg and 'class_names' in folder_cfg:
            class_names, palette = folder_cfg.get('class_names'), folder_cfg.get('palette')
        if class_names and len(class_names) != num_classes:
            det.notes.append('file lists %d class names for %d classes; names ignored'
                             % (len(class_names), num_classes))
            class_names = None
        if palette and len(palette) != num_classes:
            palette = None
        if class_names is None and num_classes == 150:
            try:
                from twins_timm.adapters import ade20k
                class_names, palette = list(ade20k.CLASSES), [list(p) for p in ade20k.PALETTE]
                det.notes.append('no class names in the file: 150 classes, assumed ADE20K')
            except ImportError:
                pass
        info = {'class_names': class_names, 'palette': palette}

    rules = table_for(det.format, task, det.src_prefix)
    expected = target_shapes(det.variant, task, num_classes, model_args, aux)
    try:
        report = apply_rules(rules, sd, drop=drop_set, expected=expected)
    except MappingError as e:  # say what the file was taken for: often the clue to what is wrong
        raise MappingError('%s looks like a %s %s checkpoint (%s) but %s' % (
            source or 'the state dict', det.variant, task, det.format, e), e.problems) from None
    for p in user_drop:
        if p not in report.dropped_parts:
            raise ValueError('--drop %s: the checkpoint has no %s to drop' % (p, PARTS[p]))
    reasons = {p: reasons[p] for p in report.dropped_parts}
    if task == 'classification' and folder_cfg and folder_cfg.get('label_names'):
        info['label_names'] = folder_cfg['label_names']
    return ConversionResult(
        state_dict=report.state_dict, format=det.format, family=det.family, size=det.size, variant=det.variant,
        task=task, num_classes=num_classes, model_args=model_args, meta=info, dropped=report.dropped,
        dropped_parts=reasons, aux_head=aux, source=source, wrapper=wrapper, n_source_keys=len(sd),
        n_mapped=report.n_mapped, notes=list(det.notes))


# ------------------------------------------------------------------------------ reverse (to mmseg)
def to_mmseg(res: ConversionResult, drop: Union[str, Iterable[str], None] = (),
             report: Optional[List[str]] = None) -> Dict[str, torch.Tensor]:
    """Our state dict back in mmsegmentation 1.x names (the inverse of the mmseg rule table).

    Segmenters become a whole mmseg segmentor (``backbone.`` / ``neck.`` / ``decode_head.`` /
    ``auxiliary_head.``); backbones become an mmseg Twins backbone (no prefix; timm's classifier head
    and final norm have no mmseg slot and must be dropped: ``drop='head,norm'``).
    """
    parts = set(_parse_drop(drop))
    if res.is_segmenter:
        rules = prefixed(MMSEG_BACKBONE, SEG_BACKBONE_PREFIX, ENCODER_PREFIX) + SEG_HEADS
    else:
        rules = MMSEG_BACKBONE
    rep = apply_rules(rules, res.state_dict, reverse=True, drop=parts)
    if report is not None:
        report.extend(sorted(rep.dropped_parts))
    return rep.state_dict


# ------------------------------------------------------------------------------------- saving
DTYPES = {'fp32': torch.float32, 'float32': torch.float32, 'fp16': torch.float16, 'float16': torch.float16,
          'half': torch.float16, 'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16}


def parse_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError('unknown dtype %r; use fp32, fp16 or bf16' % dtype)
    return DTYPES[str(dtype).lower()]


def _cast_state_dict(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> Dict[str, torch.Tensor]:
    if dtype is None:
        return dict(sd)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def reference_parity(res: ConversionResult, model: Optional[nn.Module] = None, size: int = 224,
                     seed: int = 0) -> Optional[Dict[str, Any]]:
    """Max abs difference between the converted model and timm's own Twins on a seeded input.

    Only where timm's Twins *is* the source family's computation (timm, official classification, and
    families whose settings are all timm defaults); None otherwise.
    """
    if res.is_segmenter or res.model_args:
        return None
    import timm.models.twins as timm_twins

    model = build_model(res) if model is None else model
    ref = _load_into(lambda: getattr(timm_twins, res.variant)(pretrained=False, num_classes=res.num_classes),
                     res.state_dict)
    if type(ref) is not timm_twins.Twins:
        return None
    ref.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    diff = float((ours.float() - theirs.float()).abs().max())
    return {'max_abs_diff': diff, 'reference': 'timm.models.twins.Twins', 'input': [1, 3, size, size],
            'text': 'max |converted - timm Twins| = %.2e on a seeded 1x3x%dx%d input (timm\'s Twins computes as '
                    'the official classification code)' % (diff, size, size)}


@dataclass
class SaveInfo:
    path: Path
    kind: str               # 'timm folder' | 'segmenter folder' | 'safetensors' | 'mmseg checkpoint'
    weights: Path           # the weights file inside (or the file itself)
    sha256: str
    parity: Optional[Dict[str, Any]] = None
    dropped_parts: List[str] = field(default_factory=list)   # left out of this output only


def save(res: ConversionResult, dst: PathLike, to: str = 'timm', force: bool = False,
         dtype: Union[str, torch.dtype, None] = None, parity: bool = True,
         mmseg_drop: Union[str, Iterable[str], None] = ()) -> SaveInfo:
    """Write a conversion result, atomically and never over an existing path unless ``force``.

    * ``to='timm'`` and ``dst`` a folder: a Hub folder (timm model, or SMP segmenter for fpn/upernet).
    * ``to='timm'`` and ``dst`` ending in ``.safetensors``: the state dict alone.
    * ``to='mmseg'`` and ``dst`` ending in ``.pth``: an mmsegmentation 1.x checkpoint (``{'meta', 'state_dict'}``).
    """
    from . import hub
    from .io import check_destination, save_safetensors, save_torch, sha256_file

    dst = check_destination(dst, force)
    dt = parse_dtype(dtype)
    if to == 'mmseg':
        if dst.suffix not in ('.pth', '.pt', '.bin'):
            raise ValueError('--to mmseg writes a .pth checkpoint; give an output path ending in .pth')
        dropped: List[str] = []
        sd = _cast_state_dict(to_mmseg(res, mmseg_drop, dropped), dt)
        meta: Dict[str, Any] = {'twins_timm': {'variant': res.variant, 'task': res.task, 'source_format': res.format}}
        if res.meta.get('class_names'):
            meta['dataset_meta'] = {'classes': res.meta['class_names'], 'palette': res.meta.get('palette')}
        save_torch({'meta': meta, 'state_dict': sd}, dst, force)
        return SaveInfo(dst, 'mmseg checkpoint', dst, sha256_file(dst), dropped_parts=dropped)
    if to != 'timm':
        raise ValueError('unknown output format %r; use timm (default) or mmseg' % to)
    if dst.suffix == '.safetensors':
        meta_st = {'format': 'twins_timm', 'source_format': res.format, 'variant': res.variant, 'task': res.task,
                   'num_classes': str(res.num_classes), 'model_args': json.dumps(res.model_args)}
        save_safetensors(_cast_state_dict(res.state_dict, dt), dst, force, metadata=meta_st)
        return SaveInfo(dst, 'safetensors', dst, sha256_file(dst))
    if dst.suffix in ('.pth', '.pt', '.bin'):
        raise ValueError('%s: a timm output is a Hub folder (give a folder path) or a .safetensors file; for an '
                         'mmseg .pth pass --to mmseg' % dst)
    model = build_model(res)
    par = reference_parity(res, model) if parity else None
    source_sha = sha256_file(res.source) if res.source and Path(res.source).is_file() else None
    model = model if dt is None else model.to(dt)
    if res.is_segmenter:
        hub.save_segmenter_folder(res, model, dst, force, par, source_sha)
        kind = 'segmenter folder'
    else:
        hub.save_timm_folder(res, model, dst, force, par, source_sha)
        kind = 'timm folder'
    _verify_written(dst / hub.WEIGHTS_NAME, model.state_dict())
    return SaveInfo(dst, kind, dst / hub.WEIGHTS_NAME, sha256_file(dst / hub.WEIGHTS_NAME), par)


def _verify_written(weights: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """Read the written weights back and compare them to what was meant to be written."""
    from safetensors.torch import load_file as load_st

    got = load_st(str(weights))
    bad = sorted(set(got) ^ set(expected)) + [k for k in got if k in expected and not torch.equal(got[k], expected[k])]
    if bad:
        raise OSError('the written file %s does not read back identically (%s); the disk may be full or faulty'
                      % (weights, ', '.join(bad[:5])))

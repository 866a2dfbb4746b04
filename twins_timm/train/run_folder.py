"""The run folder of `twins-timm train` (``fit(..., out)``): its layout, its checks, its atomic writes.

OUT/
  run.json                 settings of the run (recipe, batch, processes, data)
  metrics.jsonl            one JSON line per log interval (loss, lr) and per evaluation (mIoU_percent, ...:
                           percent with 2 decimals, as printed)
  checkpoints/iter_N/      save_pretrained folder (config.json, model.safetensors) + training_state.pt
                           (optimizer, scheduler, RNG, sampler position) + recipe.json
  last_checkpoint          name of the newest complete checkpoint
  best/                    save_pretrained folder of the best mIoU so far (+ recipe.json, metrics.json)

Every folder is written to a hidden temporary sibling and renamed into place, so a kill at any
moment leaves only complete checkpoints.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import load_file
from torch import nn

from twins_timm.files.atomic import atomic_path, write_folder
from .recipe import Recipe

CHECKPOINTS = 'checkpoints'
STATE_FILE = 'training_state.pt'
RECIPE_FILE = 'recipe.json'
RUN_FILE = 'run.json'
METRICS_FILE = 'metrics.jsonl'
LAST_FILE = 'last_checkpoint'
_CKPT_RE = re.compile(r'^iter_(\d+)$')


class RunFolderError(OSError):
    """--out cannot be used (not writable, or holds something else)."""


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


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as JSON at ``path``, whole or not at all (the run folder is ours: replaced freely)."""
    with atomic_path(path, force=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2))


def append_metrics(out: Path, record: Dict[str, Any]) -> None:
    """One line of OUT/metrics.jsonl: appended, the file is the run's log."""
    with open(Path(out) / METRICS_FILE, 'a') as f:
        f.write(json.dumps(record) + '\n')


def trim_metrics(path: Path, upto: int) -> None:
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


def save_model_folder(model: nn.Module, folder: Path, recipe: Recipe, extra: Optional[Dict] = None) -> None:
    """A save_pretrained folder plus the recipe it was trained with, so eval / segment / resume can read it."""
    model.save_pretrained(str(folder))
    (folder / RECIPE_FILE).write_text(json.dumps(dict(recipe=recipe.to_dict(), **(extra or {})), indent=2))


def save_checkpoint(out: Path, it: int, model: nn.Module, state: Dict[str, Any], recipe: Recipe,
                    extra: Dict[str, Any]) -> Path:
    """Write checkpoints/iter_<it>/ atomically, then point last_checkpoint at it."""
    def fill(tmp: Path) -> None:
        save_model_folder(model, tmp, recipe, extra)
        torch.save(state, tmp / STATE_FILE)

    dst = out / CHECKPOINTS / ('iter_%06d' % it)
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    write_folder(dst, fill, force=True)
    with atomic_path(out / LAST_FILE, force=True) as tmp:
        tmp.write_text('%s/%s\n' % (CHECKPOINTS, dst.name))
    return dst


def load_training_state(folder: Path) -> Dict[str, Any]:
    """The optimizer, scheduler, RNG and sampler state saved beside a checkpoint's weights (tensors only)."""
    return torch.load(folder / STATE_FILE, map_location='cpu', weights_only=True)


def read_checkpoint(folder: Path) -> Dict[str, Any]:
    """The recipe.json of checkpoint ``folder``, once every file of it has read back whole (raises if not)."""
    meta = json.loads((folder / RECIPE_FILE).read_text())
    Recipe.from_dict(meta['recipe'])
    json.loads((folder / 'config.json').read_text())
    load_training_state(folder)
    load_file(str(folder / 'model.safetensors'))
    return meta

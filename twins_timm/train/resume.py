"""What `train --resume` continues from, and what it refuses.

A run continues from its newest checkpoint that reads back whole (a damaged newest one, e.g. a file
cut short by a full disk, is passed over with a note), with the recipe stored in it: an option given
again with another value would be silently overridden by the optimizer and scheduler states, so it
is refused, as is a model whose weights do not fit the checkpoint's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from torch import nn

from .recipe import Recipe

# fit() arguments that set a recipe field of the same name -> their command-line option
RECIPE_OPTIONS = {'iters': '--iters', 'crop_size': '--crop-size', 'lr': '--lr', 'global_batch': '--global-batch',
                  'seed': '--seed'}


def newest_readable(folders: Sequence[Path], read: Callable[[Path], Dict[str, Any]],
                    log: Callable[[str], None]) -> Optional[Tuple[Path, Dict[str, Any]]]:
    """(checkpoint folder, what ``read`` returns) of the newest of ``folders`` (oldest first) that
    ``read`` gets through; None when there are none."""
    skipped = []
    for folder in reversed(list(folders)):
        try:
            meta = read(folder)
        except Exception as e:  # any failure to read a file back means the checkpoint is damaged
            skipped.append('%s: %s: %s' % (folder.name, type(e).__name__, ' '.join(str(e).split())[:200]))
            continue
        if skipped:
            log('note: passing over damaged checkpoint(s) (%s); resuming from %s, the newest complete one'
                % ('; '.join(skipped), folder))
        return folder, meta
    if skipped:
        raise ValueError('--resume: no checkpoint in %s can be read back (%s); the run cannot be continued. '
                         'Start a new run with another --out' % (Path(folders[0]).parent, '; '.join(skipped)))
    return None


def resumed_recipe(meta: Dict[str, Any], folder: Path, given: Dict[str, Any], recipe: Optional[Recipe],
                   reduce_zero_label: bool) -> Recipe:
    """The run's own recipe (stored in the checkpoint); raise when ``given`` options contradict it."""
    stored = Recipe.from_dict(meta['recipe'])
    conflicts = []
    for name, value in given.items():
        if value is not None and value != getattr(stored, name):
            conflicts.append('%s %s (the run: %s)' % (RECIPE_OPTIONS[name], value, getattr(stored, name)))
    if recipe is not None and recipe.to_dict() != stored.to_dict():
        conflicts.append('a recipe that differs from the run\'s')
    run_reduce = (meta.get('settings') or {}).get('reduce_zero_label', reduce_zero_label)
    if run_reduce != reduce_zero_label:
        conflicts.append('%s --no-reduce-zero-label (the run: %s)' % ('with' if not reduce_zero_label else 'without',
                                                                      'with' if not run_reduce else 'without'))
    if conflicts:
        raise ValueError(
            '--resume continues the run in %s with its own settings (stored in %s), but %s contradict%s them: '
            '%s. Leave these options out or give the run\'s values; to train on with new settings, start a new '
            'run from the checkpoint: --model %s --out NEW_FOLDER' % (
                folder.parent.parent, folder / 'recipe.json', 'these options' if len(conflicts) > 1 else 'this option',
                '' if len(conflicts) > 1 else 's', ', '.join(conflicts), folder))
    return stored


def check_same_model(model: nn.Module, folder: Path, meta: Dict[str, Any]) -> None:
    """Refuse a model whose weights (names and shapes) are not those saved in ``folder``."""
    from safetensors import safe_open
    with safe_open(str(folder / 'model.safetensors'), 'pt') as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if not differ:
        return
    config = json.loads((folder / 'config.json').read_text())
    spec = (meta.get('settings') or {}).get('model_spec')
    raise ValueError(
        '--resume: the run in %s trained %s, but --model gives %s (%d weight(s) differ, e.g. %s: %s there, %s '
        'here). Resume with the run\'s own model%s, or choose another --out for a new run.' % (
            folder.parent.parent, _describe(config.get('_model_class'), config.get('encoder_name'),
                                            config.get('classes')),
            _describe(type(model).__name__, getattr(model, 'encoder_name', None), getattr(model, 'classes', None)),
            len(differ), differ[0], _shape(saved.get(differ[0])), _shape(ours.get(differ[0])),
            ' (--model %s, as in its run.json)' % spec if spec else ''))


def _describe(cls: Any, encoder: Any, classes: Any) -> str:
    return 'a %s on %s with %s classes' % (cls or 'model', encoder or 'an unknown backbone', classes)


def _shape(shape: Optional[Tuple[int, ...]]) -> str:
    return 'absent' if shape is None else 'x'.join(map(str, shape)) or 'scalar'

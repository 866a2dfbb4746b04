"""Fine-tuning Twins segmenters with mmsegmentation's recipe, one process or many (torchrun).

    from twins_timm.train import build_model, fit
    model, _ = build_model('upernet:twins_svt_small', classes=10)
    result = fit(model, 'my_data', 'runs/svt_s', iters=2000, batch_size=4)
    print(result.best_miou)

See ``twins-timm train --help`` for the command and :mod:`twins_timm.train.recipe` for the values.
"""
from .data import DatasetError, SegmentationFolder, check_pair, check_pairs, find_pairs
from .engine import FitResult, fit
from .models import build_model
from .recipe import Recipe, build_optimizer, lr_factor, param_groups, recipe_for
from .run_folder import RunFolderError, checkpoint_folders
from .transforms import train_transform

__all__ = ['DatasetError', 'SegmentationFolder', 'check_pair', 'check_pairs', 'find_pairs', 'FitResult',
           'RunFolderError', 'checkpoint_folders', 'fit', 'build_model', 'Recipe', 'build_optimizer',
           'lr_factor', 'param_groups', 'recipe_for', 'train_transform']

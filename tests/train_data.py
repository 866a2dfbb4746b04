"""Training-test helpers: a tiny ADE20K-layout data set (shapes whose colour is their class) and a
Twins-SVT-S segmenter with narrow heads."""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from PIL import Image

from twins_timm import checkpoint_family_args
from twins_timm.adapters import TwinsUPerNet

# class k (0-based) is drawn in COLOURS[k]; the background is class 0
COLOURS = np.array([[20, 20, 20], [230, 40, 40], [40, 200, 60], [50, 80, 230]], np.uint8)


def make_sample(rng: np.random.Generator, h: int, w: int, classes: int) -> Tuple[np.ndarray, np.ndarray]:
    label = np.zeros((h, w), np.int64)
    yy, xx = np.mgrid[:h, :w]
    for k in range(1, classes):
        for _ in range(2):
            cy, cx = rng.integers(0, h), rng.integers(0, w)
            r = rng.integers(min(h, w) // 6, min(h, w) // 3)
            if rng.random() < 0.5:
                label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
            else:
                label[(abs(yy - cy) < r) & (abs(xx - cx) < r)] = k
    image = COLOURS[label].astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_dataset(root: Path, n_train: int = 8, n_val: int = 4, size: Tuple[int, int] = (64, 80),
                 classes: int = 4, seed: int = 0, reduce_zero_label: bool = True) -> Path:
    """root/images/{training,validation}/*.jpg + root/annotations/.../*.png; stored labels are
    class + 1 (0 = "other") when ``reduce_zero_label``, as in ADE20K."""
    rng = np.random.default_rng(seed)
    for split, n in (('training', n_train), ('validation', n_val)):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'annotations' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = make_sample(rng, *size, classes)
            name = '%s_%03d' % (split, i)
            Image.fromarray(image).save(root / 'images' / split / (name + '.png'))
            stored = label + 1 if reduce_zero_label else label
            Image.fromarray(stored.astype(np.uint8)).save(root / 'annotations' / split / (name + '.png'))
    return root


# SVT-S with 2 blocks in every stage instead of (2, 2, 10, 4): both attention kinds (windowed, global) in
# each stage, 9 M instead of 24 M parameters; learns the shapes set as well (mIoU 0.70-0.76 after 24 steps
# for seeds 0-2, against 0.67-0.73 at full depth) in half the time
SHALLOW_DEPTHS = (2, 2, 2, 2)


def tiny_model(cls=TwinsUPerNet, classes=4, dropout=True, seed=0, depths=None):
    """Twins-SVT-S with narrow heads: the real backbone (``depths=SHALLOW_DEPTHS``: fewer blocks), tests in
    seconds."""
    torch.manual_seed(seed)
    depths = {} if depths is None else {'depths': list(depths)}
    args = dict(encoder_name='twins_svt_small', classes=classes,
                encoder_args=dict(checkpoint_family_args('mmseg', 'twins_svt_small'),
                                  drop_path_rate=0.1 if dropout else 0.0, **depths),
                decoder_dropout=0.1 if dropout else 0.0)
    if cls is TwinsUPerNet:
        args.update(decoder_channels=32, aux_channels=16)
    else:
        args.update(decoder_pyramid_channels=32, decoder_segmentation_channels=16)
    return cls(**args)


def tiny_model_folder(folder: Path, cls=TwinsUPerNet) -> Path:
    """A saved shallow tiny model without dropout: what `train --model DIR` starts from in tests."""
    tiny_model(cls, dropout=False, depths=SHALLOW_DEPTHS).save_pretrained(str(folder))
    return folder

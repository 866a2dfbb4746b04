"""ADE20K-layout data sets: finding image / annotation pairs, checking them, reading them.

The layout is the one ``twins-timm eval`` and mmseg's ADE20KDataset read: DATA/images/<split>/*.jpg
and DATA/annotations/<split>/<same name>.png, one class index per pixel.  Every pair is checked
before any work starts (training, evaluation), so a bad file at the end of a set costs seconds, not
hours: :func:`check_pairs` is the one place for those rules.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from twins_timm.adapters.loss import IGNORE_INDEX
from twins_timm.inference.metrics import reduce_zero_label

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp')
ANNOTATION_MODES = ('L', 'P', 'I', 'I;16')  # single-channel integer class-index images
Pair = Tuple[Path, Path]


class DatasetError(ValueError):
    """The data folder does not hold a usable ADE20K-layout split."""


def find_pairs(data: os.PathLike, split: str) -> List[Pair]:
    """(image, annotation) pairs of an ADE20K-layout folder, sorted by name."""
    data = Path(data)
    img_dir, ann_dir = data / 'images' / split, data / 'annotations' / split
    for d in (img_dir, ann_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                '%s is not a folder; the data folder must hold images/%s/*.jpg and annotations/%s/*.png '
                '(ADE20K layout, e.g. ADEChallengeData2016)' % (d, split, split))
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError('no images (%s) in %s' % (', '.join(IMAGE_SUFFIXES), img_dir))
    pairs, missing = [], []
    for img in images:
        ann = ann_dir / (img.stem + '.png')
        (pairs if ann.is_file() else missing).append((img, ann))
    if missing:
        raise FileNotFoundError('%d image(s) have no annotation, e.g. %s for %s; every image needs '
                                'annotations/%s/<same name>.png' % (len(missing), missing[0][1],
                                                                    missing[0][0], split))
    stems = {p.stem for p, _ in pairs}
    extra = sorted(p for p in ann_dir.iterdir() if p.suffix.lower() == '.png' and p.stem not in stems)
    if extra:
        raise DatasetError('%d annotation(s) in %s have no image, e.g. %s; images and annotations must '
                           'pair up one to one (same name)' % (len(extra), ann_dir, extra[0].name))
    return pairs


def allowed_label_range(num_classes: int, reduce_zero_label: bool) -> Tuple[int, int]:
    """Smallest and largest raw annotation value (besides the ignore value) for ``num_classes``."""
    return (0, num_classes) if reduce_zero_label else (0, num_classes - 1)


def _oriented_size(im: Image.Image) -> Tuple[int, int]:
    """(w, h) after the EXIF orientation that the image reader applies."""
    w, h = im.size
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # broken EXIF: the reader ignores it too
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _label_problem(path: Path, values: np.ndarray, num_classes: int, reduce_zero: bool,
                   ignore_index: int) -> Optional[str]:
    lo, hi = allowed_label_range(num_classes, reduce_zero)
    bad = values[((values < lo) | (values > hi)) & (values != ignore_index)]
    if not bad.size:
        return None
    rule = ('0 = ignored "other", 1..%d the classes' % num_classes if reduce_zero
            else '0..%d the classes' % (num_classes - 1))
    return '%s holds label(s) %s but %d classes allow %d..%d (%s; %d ignored)' % (
        path, ', '.join(str(int(v)) for v in bad[:5]), num_classes, lo, hi, rule, ignore_index)


def _unreadable(path: Path, what: str, e: Exception) -> str:
    if isinstance(e, FileNotFoundError):
        return '%s: no such %sfile' % (path, 'annotation ' if what == 'annotation' else '')
    if isinstance(e, Image.DecompressionBombError):  # Pillow's guard: the header claims a huge image
        return '%s: too large to read (%s); downscale it or leave it out' % (path, str(e).rstrip('.'))
    if isinstance(e, UnidentifiedImageError) or what == 'image':
        return '%s: not a readable %s (%s)' % (path, what if what == 'image' else 'annotation PNG',
                                              e.__class__.__name__)
    return '%s: not a readable annotation PNG, its data is truncated or corrupt (%s)' % (path, e)


def _check_pair(image: Path, annotation: Path, num_classes: Optional[int], reduce_zero: bool,
                ignore_index: int) -> Tuple[Optional[str], Optional[np.ndarray]]:
    """(problem or None, the annotation's label values when decoded)."""
    try:
        with Image.open(image) as im:
            size = _oriented_size(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        return _unreadable(image, 'image', e), None
    try:
        with Image.open(annotation) as an:
            if an.mode not in ANNOTATION_MODES:
                return ('%s: annotation has mode %s; it must be a single-channel class-index PNG (mode L or P)'
                        % (annotation, an.mode)), None
            if an.size != size:
                return '%s is %dx%d but its annotation %s is %dx%d' % (
                    image, size[0], size[1], annotation, an.size[0], an.size[1]), None
            if num_classes is None:
                return None, None
            values = np.unique(np.asarray(an))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # truncated PNG data: OSError
        return _unreadable(annotation, 'annotation', e), None
    return _label_problem(annotation, values, num_classes, reduce_zero, ignore_index), values


def check_pair(image: Path, annotation: Path, num_classes: Optional[int] = None,
               reduce_zero: bool = True, ignore_index: int = IGNORE_INDEX) -> Optional[str]:
    """What is wrong with one pair (None if nothing): readable, annotation mode and size, labels.

    Only headers are read unless ``num_classes`` is given; then the annotation is decoded and its
    values are checked against the classes (the ignore value is always allowed).
    """
    return _check_pair(image, annotation, num_classes, reduce_zero, ignore_index)[0]


def label_convention_problem(values: Sequence[int], num_classes: int, reduce_zero: bool,
                             ignore_index: int = IGNORE_INDEX) -> Optional[str]:
    """Why the label values of a whole data set fit the other labelling convention (None: they do not).

    Both conventions store one class index per pixel: ADE20K's is 1-based (0 = "other", ignored; the
    classes are 1..N, reduce-zero-label on), the other 0-based (classes 0..N-1).  Only what is
    unambiguous is refused: with reduce-zero-label on, a label 0 that occurs while no label reaches N
    (the values fit 0..N-1 exactly, and class 0 would be ignored without a word); with it off, a label
    equal to N (which only 1..N holds).
    """
    seen = sorted(int(v) for v in set(values) if int(v) != ignore_index)
    if not seen:
        return None
    if reduce_zero and seen[0] == 0 and seen[-1] <= num_classes - 1:
        return ('the labels fit 0..%d (label 0 occurs, none is %d): 0-based class indices, it seems, but with '
                'reduce-zero-label on (the default, for ADE20K\'s 1-based files: 0 = "other", ignored, classes '
                '1..%d) class 0 would be ignored without a word and the last class would have no pixels. Pass '
                '--no-reduce-zero-label. (The rule: with reduce-zero-label on, labels that include 0 and stay '
                'below the number of classes are taken for 0-based.)' % (num_classes - 1, num_classes, num_classes))
    if not reduce_zero and seen[-1] == num_classes and seen[0] >= 0:
        return ('the labels reach %d, the number of classes: ADE20K-style 1-based class indices, it seems (0 = '
                '"other", classes 1..%d), which --no-reduce-zero-label reads as 0-based. Leave out '
                '--no-reduce-zero-label. (The rule: without reduce-zero-label, a label equal to the number of '
                'classes is taken for 1-based.)' % (num_classes, num_classes))
    return None


def check_pairs(pairs: Sequence[Pair], num_classes: Optional[int] = None, reduce_zero: bool = True,
                ignore_index: int = IGNORE_INDEX, progress: bool = False, what: str = 'data',
                workers: int = 4, report: Optional[Callable[[List], List]] = None) -> List[int]:
    """Check every pair (see :func:`check_pair`); raise one :class:`DatasetError` listing the problems.

    Returns the label values seen (sorted; empty unless ``num_classes`` is given), for
    :func:`check_label_convention` over all splits.  ``report`` merges lists over processes (sharded
    checks under torchrun): the problems found, then the values seen.
    """
    def one(pair: Pair) -> Tuple[Optional[str], Optional[np.ndarray]]:
        return _check_pair(pair[0], pair[1], num_classes, reduce_zero, ignore_index)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = pool.map(one, pairs)
        if progress and len(pairs) > 50:
            from tqdm import tqdm
            results = tqdm(results, total=len(pairs), desc='checking %s' % what, unit='file', leave=False)
        results = list(results)
    problems = [problem for problem, _ in results if problem]
    values = sorted({int(v) for _, vals in results if vals is not None for v in vals})
    if report is not None:
        problems = report(problems)
        values = sorted(set(report(values)))
    if problems:
        convention = label_convention_problem(values, num_classes, reduce_zero, ignore_index) if num_classes else None
        more = ' (and %d more)' % (len(problems) - 3) if len(problems) > 3 else ''
        hint = (' Fix or remove these files, or pass the right --classes / --no-reduce-zero-label.'
                if num_classes is not None else ' Fix or remove these files.')
        raise DatasetError('%d of %d %s pair(s) are unusable; nothing was done: %s%s.%s' % (
            len(problems), len(pairs), what, '; '.join(problems[:3]), more,
            ' ' + convention[0].upper() + convention[1:] if convention else hint))
    return values


def check_label_convention(values: Sequence[int], num_classes: int, reduce_zero: bool,
                           ignore_index: int = IGNORE_INDEX) -> None:
    """Raise :class:`DatasetError` when the labels of all splits fit the other convention."""
    problem = label_convention_problem(values, num_classes, reduce_zero, ignore_index)
    if problem:
        raise DatasetError('Nothing was done: %s' % problem)


def read_pair(image: Path, annotation: Path, reduce_zero: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 RGB image (EXIF orientation applied) and HxW int64 labels (reduced if asked)."""
    from twins_timm.inference.images import read_image, read_label_map
    rgb, _ = read_image(image)
    label = read_label_map(annotation)
    if reduce_zero:
        label = reduce_zero_label(label)
    return rgb, label


class SegmentationFolder:
    """Map-style data set over pairs: ``dataset[i] -> (image float CHW, labels int64 HW)``.

    ``transform(image_uint8_CHW_tensor, mask) -> (image, mask)`` is applied under a random state
    seeded by (seed, epoch, index), so an image gets the same augmentation whichever process or
    loader worker reads it: one process and many see the same batches, and a resumed run the same
    augmentations as an uninterrupted one.
    """

    def __init__(self, pairs: Sequence[Pair], transform=None, reduce_zero: bool = True, seed: int = 0):
        self.pairs = list(pairs)
        self.transform = transform
        self.reduce_zero = reduce_zero
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int):
        import torch
        from torchvision import tv_tensors
        rgb, label = read_pair(*self.pairs[index], reduce_zero=self.reduce_zero)
        image = tv_tensors.Image(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        mask = tv_tensors.Mask(torch.from_numpy(label))
        if self.transform is None:
            return image, mask
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            return self.transform(image, mask)

"""The files a segmentation is written as: names that never meet an input, the checks before the work,
the class-index PNG and the overlay PNG of each image (what `twins-timm segment` writes)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from twins_timm.files.paths import check_replaceable, refuse_inputs_as_outputs
from twins_timm.inference.visualize import label_image, overlay_image, png_not_ours, save_png

RANDOM_SUFFIX = '_RANDOM-WEIGHTS'  # in the names of what a random-initialised model made


def output_paths(images: List[Path], out_dir: Path, random_weights: bool = False,
                 model_inputs: Sequence[Path] = ()) -> List[Tuple[Path, Path]]:
    """(class-index PNG, overlay PNG) per image: OUT/<stem>_labels[...].png, OUT/<stem>_overlay[...].png.

    Refuses two inputs that would share outputs, and any output that is one of the inputs (the images and
    ``model_inputs``, the files the model is read from).
    """
    suffix = RANDOM_SUFFIX if random_weights else ''
    seen: Dict[str, Path] = {}
    paths = []
    for img in images:
        stem = img.stem
        if stem in seen:
            raise ValueError('%s and %s would both write %s_labels%s.png in %s; segment them into separate '
                             '--out folders' % (seen[stem], img, stem, suffix, out_dir))
        seen[stem] = img
        paths.append((out_dir / ('%s_labels%s.png' % (stem, suffix)),
                      out_dir / ('%s_overlay%s.png' % (stem, suffix))))
    refuse_inputs_as_outputs([p for pair in paths for p in pair], list(images) + list(model_inputs),
                             'Rename the input or choose another --out folder.')
    return paths


def check_outputs(outputs: List[Tuple[Path, Path]], force: bool) -> None:
    """Every output is new, or (with ``force``) a PNG twins-timm wrote before; links never count as either."""
    existing = [str(p) for pair in outputs for p in pair if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError('%d output file(s) already exist (%s%s); pass --force to replace them (only PNGs '
                              'twins-timm made; inputs are never replaced) or choose another --out'
                              % (len(existing), ', '.join(existing[:3]), ', ...' if len(existing) > 3 else ''))
    for p in existing:
        check_replaceable(p, 'the output', force, png_not_ours)


def write_segmentation(image: np.ndarray, labels: np.ndarray, paths: Tuple[Path, Path], palette: np.ndarray,
                       class_names: Sequence[str], opacity: float = 0.5, banner: Optional[str] = None,
                       text: Optional[Dict[str, str]] = None, overwrite: bool = False) -> None:
    """One image's class-index PNG (a palette PNG: indices that also open in colour) and its overlay (the
    photo blended with the class colours, a legend, ``banner`` across the top); ``text`` goes into both."""
    label_path, overlay_path = paths
    save_png(label_image(labels, palette), label_path, overwrite=overwrite, text=text)
    save_png(overlay_image(image, labels, palette, class_names, alpha=opacity, banner=banner),
             overlay_path, overwrite=overwrite, text=text)


def label_summary(labels: np.ndarray, class_names: Sequence[str], top: int = 5) -> str:
    """The ``top`` classes by area, e.g. 'wall 41%, floor 22%, ceiling 9%'."""
    counts = np.bincount(labels.reshape(-1), minlength=len(class_names))
    order = np.argsort(-counts, kind='stable')[:top]
    return ', '.join('%s %.0f%%' % (class_names[i], 100.0 * counts[i] / labels.size) for i in order if counts[i])

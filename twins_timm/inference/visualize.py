"""Pictures of a segmentation: class-index PNGs, colour overlays with a legend, atomic saving."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from twins_timm.adapters.base import default_class_names, default_palette
from twins_timm.files.atomic import atomic_path


def make_palette(num_classes: int, palette: Optional[Sequence[Sequence[int]]] = None) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ``palette`` where given, the segmenters' default palette after it."""
    given = np.asarray(palette, dtype=np.int64).reshape(-1, 3) if palette is not None and len(palette) else np.zeros((0, 3), np.int64)
    if given.size and (given.min() < 0 or given.max() > 255):
        raise ValueError('palette colours must be RGB triples in 0..255')
    extra = default_palette(num_classes)[len(given):]
    colours = np.concatenate([given[:num_classes], np.asarray(extra, np.int64).reshape(-1, 3)])
    return colours.astype(np.uint8)


def class_name_list(num_classes: int, class_names: Optional[Sequence[str]] = None) -> List[str]:
    names = list(class_names or [])[:num_classes]
    return names + default_class_names(num_classes)[len(names):]


def colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """HxW class indices -> HxWx3 uint8 colours."""
    return palette[np.asarray(labels)]


def blend(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float,
          chunk_pixels: int = 1 << 20) -> np.ndarray:
    """HxWx3 uint8: ``image * (1 - alpha) + colour * alpha``, rounded; a band of rows at a time, so the
    float temporaries stay a few MB whatever the photo's size."""
    h, w = labels.shape
    out = np.empty((h, w, 3), np.uint8)
    step = max(1, chunk_pixels // max(1, w))
    for r0 in range(0, h, step):
        rows = slice(r0, r0 + step)
        mixed = image[rows].astype(np.float32) * (1 - alpha) + colorize(labels[rows], palette).astype(np.float32) * alpha
        out[rows] = np.clip(mixed + 0.5, 0, 255)
    return out


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Class-index PNG: pixel value = class index (0-based, as the model's class_names).

    Up to 256 classes it is a palette ('P') image, so viewers show colours while
    ``np.asarray(Image.open(path))`` gives the indices; above that, 16-bit greyscale.
    """
    labels = np.asarray(labels)
    if len(palette) <= 256:
        h, w = labels.shape
        img = Image.frombytes('P', (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
        flat = np.zeros((256, 3), np.uint8)
        flat[:len(palette)] = palette
        img.putpalette(flat.reshape(-1).tolist())
        return img
    return Image.fromarray(labels.astype(np.uint16))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    return x1 - x0, y1 - y0


def overlay_image(image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                  class_names: Sequence[str], alpha: float = 0.5,
                  banner: Optional[str] = None, legend: bool = True) -> Image.Image:
    """Image blended with class colours, a legend of the classes present, optional red banner.

    The legend lists classes by decreasing area with their share of the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError('overlay opacity must be between 0 and 1, got %r' % (alpha,))
    labels = np.asarray(labels)
    h, w = labels.shape
    canvas_img = Image.fromarray(blend(image, labels, palette, alpha))
    font_size = max(12, min(h, w) // 40)
    font = _font(font_size)
    probe = ImageDraw.Draw(canvas_img)
    pad = font_size // 2
    row_h = font_size + pad
    banner_h = 0
    if banner:
        banner_h = _text_size(probe, banner, font)[1] + 2 * pad
    entries = []
    if legend:
        counts = np.bincount(labels.reshape(-1), minlength=len(palette))
        for idx in np.argsort(-counts, kind='stable'):
            if counts[idx] == 0:
                break
            share = 100.0 * counts[idx] / labels.size
            entries.append((int(idx), '%s  %.1f%%' % (class_names[idx], share) if share >= 0.1
                            else '%s  <0.1%%' % class_names[idx]))
    # fill the image height; small images get a legend taller than themselves (up to 24 rows)
    rows_per_col = max(1, (h - pad) // row_h, min(len(entries), 24))
    n_cols = -(-len(entries) // rows_per_col) if entries else 0
    col_w = (max(_text_size(probe, t, font)[0] for _, t in entries) + font_size + 3 * pad) if entries else 0
    legend_rows = min(len(entries), rows_per_col)
    width = w + n_cols * col_w + (pad if entries else 0)
    height = banner_h + max(h, legend_rows * row_h + pad)
    canvas = Image.new('RGB', (width, height), (255, 255, 255))
    canvas.paste(canvas_img, (0, banner_h))
    draw = ImageDraw.Draw(canvas)
    if banner:
        draw.rectangle([0, 0, width, banner_h - 1], fill=(200, 0, 0))
        draw.text((pad, pad), banner, fill=(255, 255, 255), font=font)
    for k, (idx, text) in enumerate(entries):
        col, row = divmod(k, rows_per_col)
        x = w + pad + col * col_w
        y = banner_h + pad + row * row_h
        colour = tuple(int(c) for c in palette[idx])
        draw.rectangle([x, y, x + font_size, y + font_size], fill=colour, outline=(0, 0, 0))
        draw.text((x + font_size + pad, y), text, fill=(0, 0, 0), font=font)
    return canvas


SOFTWARE = 'twins-timm'  # the PNG 'Software' text of every picture save_png writes: what marks it as ours


def png_not_ours(path: Path) -> Optional[str]:
    """Why ``path`` is not a PNG that save_png wrote (None: it is one; --force may replace it)."""
    try:
        with Image.open(path) as im:
            software = im.text.get('Software') if im.format == 'PNG' else None
    except Exception:  # Pillow raises many types for files that are no image
        return 'not a PNG image'
    return None if software == SOFTWARE else 'a PNG that twins-timm did not make'


def save_png(img: Image.Image, path: os.PathLike, overwrite: bool = False,
             text: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``img`` as PNG through a temporary file and a rename; replace only a PNG of ours, when asked.

    ``text``: PNG tEXt chunks (e.g. the model that made it), readable as ``Image.open(p).text``; the
    'Software' chunk is always ``SOFTWARE``.
    """
    info = PngInfo()
    for key, value in dict(text or {}, Software=SOFTWARE).items():
        info.add_text(key, value)
    with atomic_path(path, force=overwrite, not_ours=png_not_ours) as tmp:
        img.save(tmp, format='PNG', pnginfo=info)
    return Path(path)

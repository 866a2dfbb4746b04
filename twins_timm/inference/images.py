"""Reading images for inference, evaluation and training.

Images are decoded with Pillow into HxWx3 uint8 RGB (what mmseg's loader hands its pipeline:
greyscale and palette images expanded to RGB, alpha dropped, 16-bit values cut to their high byte).
"""
from __future__ import annotations

import contextlib
import os
import stat
import warnings
from importlib import resources
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Largest image decoded unless asked (--max-pixels): Pillow's own decompression-bomb error threshold
# (2 x Image.MAX_IMAGE_PIXELS), so every image Pillow would decode with only a warning is read
# silently, and larger ones get a clear error that says how to raise the limit.
DEFAULT_MAX_PIXELS = 178_956_970
# Peak memory of read_image per pixel: Pillow's RGBX buffer (4 bytes) and the array made from it
# (the bytes Pillow hands out and numpy's copy of them, 3 + 3); measured with ru_maxrss on a 12 MP PNG.
DECODE_BYTES_PER_PIXEL = 10

# Pillow modes converted to RGB, with the note printed for each.
_CONVERTED_MODES = {
    'L': 'greyscale, expanded to RGB',
    '1': 'black-and-white, expanded to RGB',
    'P': 'palette image, expanded to RGB',
    'PA': 'palette image with alpha, expanded to RGB and alpha dropped',
    'LA': 'greyscale with alpha, expanded to RGB and alpha dropped',
    'RGBA': 'alpha channel dropped (as OpenCV/mmseg do)',
    'RGBa': 'alpha channel dropped',
    'RGBX': 'padding channel dropped',
    'CMYK': 'CMYK converted to RGB without a colour profile (colours may be off)',
    'YCbCr': 'YCbCr converted to RGB',
    'LAB': 'Lab converted to RGB',
    'HSV': 'HSV converted to RGB',
}
# 16-bit greyscale: each value cut to its high byte (v // 256), as OpenCV's imread (mmseg's loader) and
# Pillow's own reading of 16-bit RGB PNGs do, then expanded to RGB.
_SIXTEEN_BIT_GREY = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_SIXTEEN_BIT_NOTE = '16-bit values cut to 8 bits (high byte, as OpenCV)'
_SIXTEEN_BIT_GREY_NOTE = '16-bit greyscale, cut to 8 bits (high byte, as OpenCV) and expanded to RGB'


def sample_image_path() -> Path:
    """The sample photo that ships with the package (twins_timm/data/coffee.png)."""
    return Path(str(resources.files('twins_timm') / 'data' / 'coffee.png'))


@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's global decompression-bomb check and warning off: the caller applies its own limit."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _memory_size(n_bytes: float) -> str:
    """'3.2 GB' / '45 MB' / '12 kB': two significant figures at least, at any size."""
    for unit, scale in (('GB', 1e9), ('MB', 1e6)):
        if n_bytes >= scale:
            return '%.*f %s' % (1 if n_bytes < 10 * scale else 0, n_bytes / scale, unit)
    return '%.0f kB' % max(1, n_bytes / 1e3)


def _check_pixels(path: Path, size: Tuple[int, int], max_pixels: Optional[int]) -> None:
    w, h = size
    if max_pixels and w * h > max_pixels:
        raise ValueError(
            '%s is %dx%d = %.1f megapixels, above the limit of %s megapixels that guards against '
            'decompression bombs (decoding it takes about %s of memory). If the image is genuine, '
            'raise the limit: twins-timm segment --max-pixels %d (0: no limit), or '
            'read_image(path, max_pixels=%d) in Python.'
            % (path, w, h, w * h / 1e6, '%g' % (max_pixels / 1e6),
               _memory_size(w * h * DECODE_BYTES_PER_PIXEL), w * h, w * h))


def _require_regular_file(path: Path, what: str) -> None:
    """Refuse what is not a regular file before opening it: a FIFO blocks the reader until someone
    writes, /dev/zero and the like never end."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError('%s: no such %s' % (path, what)) from None
    except OSError as e:
        raise ValueError('%s: cannot be read: %s' % (path, e.strerror or e)) from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError('%s: is a folder, not an image' % path)
    if not stat.S_ISREG(mode):
        kind = ('a named pipe (FIFO)' if stat.S_ISFIFO(mode) else 'a device' if stat.S_ISCHR(mode) or
                stat.S_ISBLK(mode) else 'a socket' if stat.S_ISSOCK(mode) else 'not a regular file')
        raise ValueError('%s: is %s, not an image file; save the image to a file and pass that' % (path, kind))


def check_image(path: os.PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
                ) -> Tuple[Tuple[int, int], Optional[str]]:
    """Open the header of ``path``; return ((w, h), conversion note) or raise a clear error.

    ``max_pixels`` (None or 0: no limit) replaces Pillow's decompression-bomb warning and error.
    """
    path = Path(path)
    _require_regular_file(path, 'file')
    try:
        with _own_pixel_limit(), Image.open(path) as im:
            mode, size, deep = im.mode, im.size, _sixteen_bit(im)
    except UnidentifiedImageError:
        raise ValueError('%s: not an image Pillow can read (PNG, JPEG, BMP, TIFF, WebP, ...)' % path) from None
    except OSError as e:
        raise ValueError('%s: cannot be read as an image: %s' % (path, e)) from None
    _check_pixels(path, size, max_pixels)
    if mode in _SIXTEEN_BIT_GREY:
        return size, _SIXTEEN_BIT_GREY_NOTE
    if mode != 'RGB' and mode not in _CONVERTED_MODES:
        raise ValueError('%s: image mode %r (32-bit or floating-point pixels) is not supported; '
                         'save it as 8- or 16-bit RGB or greyscale first' % (path, mode))
    notes = [_CONVERTED_MODES[mode]] if mode in _CONVERTED_MODES else []
    if deep:  # Pillow reads 16-bit colour as 8-bit itself, keeping the high byte
        notes.insert(0, _SIXTEEN_BIT_NOTE)
    return size, '; '.join(notes) or None


def _sixteen_bit(im: Image.Image) -> bool:
    """Whether the file stores 16 bits a channel (Pillow's raw mode, e.g. 'RGB;16B', says so)."""
    try:
        args = im.tile[0].args if im.tile else None
    except (AttributeError, IndexError):
        return False
    rawmode = args[0] if isinstance(args, tuple) and args else args
    return isinstance(rawmode, str) and ';16' in rawmode


def read_image(path: os.PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
               ) -> Tuple[np.ndarray, Optional[str]]:
    """Decode ``path`` into an HxWx3 uint8 RGB array (EXIF orientation applied) and a note.

    16-bit images keep the high byte of each value (v // 256), as OpenCV's imread does for mmseg.
    """
    _, note = check_image(path, max_pixels)
    try:
        with _own_pixel_limit(), Image.open(path) as im:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
            if im.mode in _SIXTEEN_BIT_GREY:
                grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2), note
            rgb = np.array(im if im.mode == 'RGB' else im.convert('RGB'), dtype=np.uint8)
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError('%s: image data is corrupt or truncated: %s' % (path, e)) from None
    except MemoryError:
        raise ValueError('%s: not enough memory to decode this image' % path) from None
    return rgb, note


def read_label_map(path: os.PathLike) -> np.ndarray:
    """Decode a class-index PNG (mode L or P) into an HxW integer array, values untouched."""
    path = Path(path)
    _require_regular_file(path, 'annotation file')
    try:
        with _own_pixel_limit(), Image.open(path) as im:
            _check_pixels(path, im.size, DEFAULT_MAX_PIXELS)
            if im.mode not in ('L', 'P', 'I', 'I;16'):
                raise ValueError('%s: annotation has mode %r; expected a single-channel class-index '
                                 'PNG (mode L or P)' % (path, im.mode))
            try:
                return np.asarray(im).astype(np.int64)
            except (OSError, SyntaxError) as e:  # truncated or corrupt PNG data
                raise ValueError('%s: annotation data is truncated or corrupt (%s)' % (path, e)) from None
    except UnidentifiedImageError:
        raise ValueError('%s: not an image Pillow can read' % path) from None

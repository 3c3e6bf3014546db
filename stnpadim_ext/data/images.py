"""Turning whatever the user passes as `images` into float batches [B, 3, H, W] in [0, 1].

Accepted (DESIGN.md, public API): a tensor [B, 3, H, W] or [3, H, W]; one path or a list
of paths; a DataLoader or any iterable yielding tensors, or tuples/dicts whose first /
"image" item is one.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# The only PIL decoders a file is handed to, whatever its name says: no EPS (Ghostscript),
# no exotic plugin parsing hostile bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Decompression-bomb guard: a 388 KB PNG can claim 20000 x 20000 pixels. 144 megapixels
# (12000 x 12000) admits any camera image while bounding one decode to ~0.6 GB (RGBA uint8).
MAX_PIXELS = 12000 * 12000
# Rounding slack of the [0, 1] check: resized or converted images may overshoot by an ulp.
RANGE_SLACK = 1e-3


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None,
               max_side: int | None = None) -> torch.Tensor:
    """Reads one image as float [3, H, W] in [0, 1], whatever its mode (L, RGBA, I;16, ...).

    Only the formats in IMAGE_FORMATS are decoded, images above MAX_PIXELS are refused, and
    a large image is shrunk while it is decoded (JPEG: DCT scaling; others: box reduction
    to no less than 4x the target side, 1x for `max_side`; then the antialiased resize), so
    memory follows the target size, not the file's.

    Args:
        path: image file.
        size: optional (H, W) or int to resize to (bilinear, antialiased).
        max_side: without `size`, shrink (keeping the aspect ratio) so that the longer side
            is at most this.

    Raises:
        InputError naming the file: missing, empty, not an allowed format, unreadable, too
        many pixels, or NaN / Inf pixel values (float TIFFs).
    """
    path = Path(path)
    with open_image(path) as img:
        try:
            oversample = 4  # model input: the antialiased resize does the last 4x
            if size is None and max_side is not None and max(img.size) > max_side:
                scale = max_side / max(img.size)
                size = (max(1, round(img.height * scale)), max(1, round(img.width * scale)))
                oversample = 1  # a picture to look at: box reduction is plenty
            target = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
            array = _to_float_rgb(_shrink_on_decode(img, target, oversample))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{path}: not a readable image ({exc})") from None
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    if size is not None:
        tensor = resize(tensor[None], size)[0]
    return tensor.contiguous()


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Opens an image file lazily (header only) after the checks every reader needs.

    Raises:
        InputError naming the file: missing, empty, not one of IMAGE_FORMATS (no other PIL
        plugin ever sees the bytes), or more than MAX_PIXELS pixels.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own limit replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"{path}: not a readable image (not a PNG, JPEG, BMP, TIFF or WebP "
                         "file)") from None
    except Image.DecompressionBombError:
        raise InputError(f"{path}: image has too many pixels (limit {MAX_PIXELS:,})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    with img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise InputError(f"{path}: image is {width}x{height} = {width * height:,} pixels, "
                             f"above the limit of {MAX_PIXELS:,}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield img


def _shrink_on_decode(img: Image.Image, target: tuple[int, int] | None,
                      oversample: int) -> Image.Image:
    """Decodes `img`, reduced by an integer factor while it stays >= oversample x target (H, W)."""
    if target is None:
        img.load()
        return img
    keep = (oversample * target[1], oversample * target[0])  # (W, H)
    if img.format == "JPEG":
        img.draft(img.mode, keep)  # DCT scaling: the full-size image is never decoded
    img.load()
    factor = min(img.width // keep[0], img.height // keep[1])
    if factor >= 2:
        try:
            return img.reduce(factor)
        except ValueError:  # a mode reduce does not handle (I;16, 1): keep the full decode
            pass
    return img


def _to_float_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale by its real range
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():  # would clip to 0 / 1 or poison every score
            raise ValueError("it holds NaN or Inf pixel values")
        arr = np.clip(arr, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite onto black, so transparent background reads as background, not noise.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def resize(batch: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of [B, C, H, W] to size (int: square)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(batch.shape[-2:]) == size:
        return batch
    return torch.nn.functional.interpolate(batch, size=size, mode="bilinear",
                                           align_corners=False, antialias=True)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly in `folder`, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def check_batch(batch: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Validates one image batch, returns it as float [B, 3, H, W]."""
    if not isinstance(batch, torch.Tensor):
        raise InputError(f"{what} must be a tensor, a path, a list of paths or an iterable of "
                         f"tensors; got {type(batch).__name__}")
    if batch.dim() == 3:
        batch = batch[None]
    if batch.dim() != 4:
        raise InputError(f"{what} must have shape [B, 3, H, W]; got {list(batch.shape)}")
    if batch.shape[1] == 1:
        batch = batch.expand(-1, 3, -1, -1)
    if batch.shape[1] != 3:
        raise InputError(f"{what} must have 3 (or 1) channels; got shape {list(batch.shape)}")
    if not batch.is_floating_point():
        raise InputError(f"{what} must be a float tensor in [0, 1]; got dtype {batch.dtype} "
                         "(divide uint8 images by 255)")
    if batch.numel() == 0:
        raise InputError(f"{what} is empty: shape {list(batch.shape)}")
    if batch.is_floating_point():
        _check_range(batch, what)
    return batch


def _check_range(batch: torch.Tensor, what: str) -> None:
    """Float images must be finite and in [0, 1] (up to RANGE_SLACK): a NaN would come out
    as NaN scores, ImageNet-normalised or 0..255 input as garbage ones."""
    low, high = (float(v) for v in torch.aminmax(batch.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):  # aminmax propagates NaN
        raise InputError(f"{what} contain NaN or Inf values")
    if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
        raise InputError(f"{what} must be in [0, 1]; got values from {low:.4g} to {high:.4g} "
                         "(pass images as float in [0, 1], not normalised or 0..255)")


def describe(images) -> str:
    """How a message names an `images` argument: the path, the one folder of a list of
    paths, else a count or "images"."""
    if _is_path(images):
        return str(images)
    if isinstance(images, (list, tuple)) and images and all(_is_path(p) for p in images):
        folders = {str(Path(p).parent) for p in images}
        return folders.pop() if len(folders) == 1 else f"{len(images)} image files"
    return "images"


def _unwrap(item):
    if isinstance(item, dict):
        if "image" not in item:
            raise InputError(f"dict batches need an 'image' key; got keys {sorted(item)}")
        return item["image"]
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    return item


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def iter_batches(images, batch_size: int = 32, size: int | tuple[int, int] | None = None,
                 allow_empty: bool = False) -> Iterator[torch.Tensor]:
    """Yields float batches [b, 3, H, W] from any accepted `images` input.

    Args:
        images: tensor, path, list of paths, folder, DataLoader or iterable (see module doc).
        batch_size: batch size used when splitting tensors and path lists (iterables keep
            their own batching).
        size: when given, every batch is resized to it (needed for paths of mixed sizes).
        allow_empty: an iterable or list that yields nothing is not an error (a process's
            share of a distributed fit may be empty).
    """
    if isinstance(images, torch.Tensor):
        images = check_batch(images)
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size]
            yield resize(chunk, size) if size is not None else chunk
        return
    if _is_path(images):
        images = list_images(images) if Path(images).is_dir() else [Path(images)]
    if isinstance(images, (list, tuple)) and images and all(_is_path(p) for p in images):
        for start in range(0, len(images), batch_size):
            chunk = [load_image(p, size) for p in images[start:start + batch_size]]
            shapes = {tuple(t.shape) for t in chunk}
            if len(shapes) > 1:
                raise InputError(f"images have different sizes {sorted(shapes)}; resize them to one "
                                 f"size or pass each size in its own call")
            yield torch.stack(chunk)
        return
    if not isinstance(images, Iterable):
        raise InputError(f"images must be a tensor, a path, a list of paths or an iterable of "
                         f"tensors; got {type(images).__name__}")
    empty = True
    for item in images:
        batch = check_batch(_unwrap(item))
        empty = False
        yield resize(batch, size) if size is not None else batch
    if empty and not allow_empty:
        raise InputError("images is empty: nothing to process")

"""Turning whatever the user passes as `images` into float batches [B, 3, H, W] in [0, 1].

Accepted (DESIGN.md, public API): a tensor [B, 3, H, W] or [3, H, W]; one path or a list
of paths; a DataLoader or any iterable yielding tensors, or tuples/dicts whose first /
"image" item is one.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def load_image(path: str | os.PathLike, size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Reads one image as float [3, H, W] in [0, 1], whatever its mode (L, RGBA, I;16, ...).

    Args:
        path: image file.
        size: optional (H, W) or int to resize to (bilinear, antialiased).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            array = _to_float_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if size is not None:
        tensor = resize(tensor[None], size)[0]
    return tensor


def _to_float_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale by its real range
        arr = np.asarray(img, dtype=np.float32)
        scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.clip(np.asarray(img, dtype=np.float32), 0.0, 1.0)
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
    return batch


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

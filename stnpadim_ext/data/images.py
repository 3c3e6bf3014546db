"""Turning whatever the user passes as `images` into batches [B, 3, H, W].

Accepted (DESIGN.md, public API): a tensor [B, 3, H, W] or [3, H, W], float in [0, 1] or
uint8 in 0..255; one path or a list of paths; a DataLoader or any iterable yielding
tensors, or tuples/dicts whose first / "image" item is one.

Files go through one pipeline (`iter_image_batches`): a thread pool decodes them in
parallel (PIL releases the GIL while it decodes and resizes), in order, a window of two
batches ahead of the consumer; each file is reduced while it decodes when a target size
is known; 8-bit images travel as uint8 (4x fewer bytes than float32) and become float on
the model's device (`as_float`); for a CUDA device, batches are pinned and copied one
ahead on a side stream.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

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
# Modes with more than 8 bits per sample: read as float32, not uint8.
DEEP_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def load_image(path: str | os.PathLike | bytes, size: int | tuple[int, int] | None = None,
               max_side: int | None = None, name: str | None = None) -> torch.Tensor:
    """Reads one image as float [3, H, W] in [0, 1], whatever its mode (L, RGBA, I;16, ...).

    Args:
        path: image file, or the file's contents as bytes.
        size: optional (H, W) or int to resize to (bilinear, antialiased).
        max_side: without `size`, shrink (keeping the aspect ratio) so that the longer side
            is at most this.
        name: how messages name in-memory bytes (default "image").

    Raises:
        InputError naming the file (see `decode_image`).
    """
    return as_float(decode_image(path, size, max_side, name)[0]).contiguous()


def decode_image(path: str | os.PathLike | bytes, size: int | tuple[int, int] | None = None,
                 max_side: int | None = None, name: str | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reads one image file: the one decoder behind `load_image` and the batch pipeline.

    Only the formats in IMAGE_FORMATS are decoded, images above MAX_PIXELS are refused, and
    a large image is shrunk while it is decoded (JPEG: DCT scaling; others: box reduction
    to no less than 4x the target side, 1x for `max_side`; then the antialiased resize), so
    memory and time follow the target size, not the file's. 8-bit images stay uint8 and
    are resized by PIL; deeper ones are read as float32 and resized by torch.

    Args:
        path: image file, or the file's contents as bytes (an upload: same checks, same
            decoders, same pixels).
        size: optional (H, W) or int to resize to (bilinear, antialiased).
        max_side: without `size`, shrink (keeping the aspect ratio) so that the longer side
            is at most this.
        name: how messages name in-memory bytes (default "image").

    Returns:
        (image [3, H, W], (H, W) of the file): uint8 for 8-bit files, float32 in [0, 1]
        for deeper ones (16-bit, 32-bit, float).

    Raises:
        InputError naming the file: missing, empty, not an allowed format, unreadable, too
        many pixels, or NaN / Inf pixel values (float TIFFs).
    """
    label = _label(path, name)
    with open_image(path, name) as img:
        source = (img.height, img.width)
        try:
            oversample = 4  # model input: the antialiased resize does the last 4x
            if size is None and max_side is not None and max(img.size) > max_side:
                scale = max_side / max(img.size)
                size = (max(1, round(img.height * scale)), max(1, round(img.width * scale)))
                oversample = 1  # a picture to look at: box reduction is plenty
            target = None if size is None else _hw(size)
            img = _shrink_on_decode(img, target, oversample)
            if img.mode in DEEP_MODES:
                tensor = torch.from_numpy(_to_float_rgb(img)).permute(2, 0, 1)
                return (tensor if target is None else resize(tensor[None], target)[0]), source
            rgb = _to_rgb8(img)
            if target is not None and rgb.size != target[::-1]:
                rgb = rgb.resize(target[::-1], Image.Resampling.BILINEAR)
            array = np.array(rgb)  # a writable copy: torch.from_numpy needs one
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise InputError(f"{label}: not a readable image ({exc})") from None
    # [H, W, 3] viewed as [3, H, W]: channels_last strides, the layout the backbone wants.
    return torch.from_numpy(array).permute(2, 0, 1), source


@contextlib.contextmanager
def open_image(path: str | os.PathLike | bytes, name: str | None = None) -> Iterator[Image.Image]:
    """Opens an image file (or its contents as bytes) lazily, header only, after the checks
    every reader needs.

    Args:
        path: image file, or the file's contents as bytes.
        name: how messages name in-memory bytes (default "image").

    Raises:
        InputError naming the file: missing, empty, not one of IMAGE_FORMATS (no other PIL
        plugin ever sees the bytes), or more than MAX_PIXELS pixels.
    """
    label = _label(path, name)
    if isinstance(path, (bytes, bytearray, memoryview)):
        if len(path) == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
        source = io.BytesIO(path)
    else:
        source = Path(path)
        if not source.is_file():
            raise InputError(f"{label}: no such image file")
        if source.stat().st_size == 0:
            raise InputError(f"{label}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # our own limit replaces PIL's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise InputError(f"{label}: not a readable image (not a PNG, JPEG, BMP, TIFF or WebP "
                         "file)") from None
    except Image.DecompressionBombError:
        raise InputError(f"{label}: image has too many pixels (limit {MAX_PIXELS:,})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{label}: not a readable image ({exc})") from None
    with img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise InputError(f"{label}: image is {width}x{height} = {width * height:,} pixels, "
                             f"above the limit of {MAX_PIXELS:,}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield img


def _label(path, name: str | None) -> str | Path:
    """How a message names an image: its path, or `name` (default "image") for bytes."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return name or "image"
    return Path(path)


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
    """[H, W, 3] float32 in [0, 1] from a 16-bit, 32-bit or float image."""
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if not np.isfinite(arr).all():  # would clip to 0 / 1 or poison every score
            raise ValueError("it holds NaN or Inf pixel values")
        arr = np.clip(arr, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    # 16/32-bit grey: scale by its real range.
    arr = np.asarray(img, dtype=np.float32)
    scale = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    arr = np.clip(arr / scale, 0.0, 1.0)
    return np.repeat(arr[..., None], 3, axis=2)


def _to_rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit image of any mode (L, P, RGBA, CMYK, ...) as RGB."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite onto black, so transparent background reads as background, not noise.
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def as_float(images: torch.Tensor, device=None) -> torch.Tensor:
    """Images as float32 in [0, 1] on `device` (default: where they are).

    uint8 images (0..255) cross to the device first (4x fewer bytes) and are divided by
    255 there; float images are cast to float32.
    """
    images = images.to(device, non_blocking=True) if device is not None else images
    if images.dtype == torch.uint8:
        return images.float() / 255
    return images.float()


def resize(batch: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of [B, C, H, W] to size (int: square)."""
    size = _hw(size)
    if tuple(batch.shape[-2:]) == size:
        return batch
    return torch.nn.functional.interpolate(batch, size=size, mode="bilinear",
                                           align_corners=False, antialias=True)


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


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
    """Validates one image batch, returns it as [B, 3, H, W] (float, or uint8 for 0..255)."""
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
    if not (batch.is_floating_point() or batch.dtype == torch.uint8):
        raise InputError(f"{what} must be a float tensor in [0, 1] or a uint8 tensor in 0..255; "
                         f"got dtype {batch.dtype}")
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


class Batch(NamedTuple):
    """One batch from `iter_image_batches`.

    Attributes:
        images: [b, 3, H, W], uint8 (0..255) or float in [0, 1].
        source_size: (H, W) of the images as given (before any resize), or None when the
            batch's files differ in size.
    """

    images: torch.Tensor
    source_size: tuple[int, int] | None


def iter_batches(images, batch_size: int = 32, size: int | tuple[int, int] | None = None,
                 allow_empty: bool = False, device=None) -> Iterator[torch.Tensor]:
    """Yields batches [b, 3, H, W] (uint8 or float in [0, 1]: see `as_float`) from any
    accepted `images` input; `iter_image_batches` without the source sizes.

    Args:
        images: tensor, path, list of paths, folder, DataLoader or iterable (see module doc).
        batch_size: batch size used when splitting tensors and path lists (iterables keep
            their own batching).
        size: when given, every batch is resized to it (needed for paths of mixed sizes).
        allow_empty: an iterable or list that yields nothing is not an error (a process's
            share of a distributed fit may be empty).
        device: deliver the batches on this device (default: the CPU, as decoded).
    """
    for batch in iter_image_batches(images, batch_size, size, allow_empty, device=device):
        yield batch.images


def iter_image_batches(images, batch_size: int = 32, size: int | tuple[int, int] | None = None,
                       allow_empty: bool = False, *, file_size: int | tuple[int, int] | None = None,
                       device=None) -> Iterator[Batch]:
    """Yields `Batch`es from any accepted `images` input; the one input path.

    Args:
        images, batch_size, size, allow_empty, device: as for `iter_batches`.
        file_size: files only, when `size` is None: each file is decoded straight to this
            size (for a model that resizes to it anyway), while `source_size` keeps the
            file's own size; files of one batch must then share their size.
    """
    if isinstance(images, torch.Tensor):
        images = check_batch(images)
        batches = (Batch(images[i:i + batch_size] if size is None else
                         resize(images[i:i + batch_size], size), tuple(images.shape[-2:]))
                   for i in range(0, images.shape[0], batch_size))
    elif _is_path(images) or (isinstance(images, (list, tuple)) and images
                              and all(_is_path(p) for p in images)):
        if _is_path(images):
            images = list_images(images) if Path(images).is_dir() else [Path(images)]
        pin = device is not None and torch.device(device).type == "cuda"
        batches = _decode_files(list(images), batch_size, size, file_size, pin)
    elif isinstance(images, Iterable):
        batches = _iterable_batches(images, size, allow_empty)
    else:
        raise InputError(f"images must be a tensor, a path, a list of paths or an iterable of "
                         f"tensors; got {type(images).__name__}")
    yield from _to_device(batches, device)


def _iterable_batches(images: Iterable, size, allow_empty: bool) -> Iterator[Batch]:
    empty = True
    for item in images:
        batch = check_batch(_unwrap(item))
        empty = False
        yield Batch(batch if size is None else resize(batch, size), tuple(batch.shape[-2:]))
    if empty and not allow_empty:
        raise InputError("images is empty: nothing to process")


# Decode threads of this process when set (a torchrun rank's share of the host's cores,
# set by distributed.session); None: one per core this process may run on.
DECODE_WORKERS: int | None = None


def decode_workers() -> int:
    """Decode threads: DECODE_WORKERS, else one per core this process may run on."""
    if DECODE_WORKERS is not None:
        return DECODE_WORKERS
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decode_files(paths: list, batch_size: int, size, file_size, pin: bool) -> Iterator[Batch]:
    """Decodes `paths` on a thread pool, in order, a window of two batches ahead: while the
    consumer works on one batch, the next one decodes. Same images, same order as decoding
    them one by one (`decode_image` is the only decoder); the first bad file raises."""
    target = size if size is not None else file_size
    pool = ThreadPoolExecutor(min(decode_workers(), len(paths)), thread_name_prefix="stnpadim-decode")
    pending, queue = deque(), iter(paths)

    def fill():
        while len(pending) < 2 * batch_size and (path := next(queue, None)) is not None:
            pending.append(pool.submit(decode_image, path, target))

    try:
        for start in range(0, len(paths), batch_size):
            fill()
            chunk = [pending.popleft().result() for _ in range(min(batch_size, len(paths) - start))]
            fill()
            yield assemble(chunk, pin, resized=size is not None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def assemble(chunk: list[tuple[torch.Tensor, tuple[int, int]]], pin: bool = False,
             resized: bool = True) -> Batch:
    """Stacks decoded images into one batch (pinned for a CUDA copy): uint8 in channels_last
    layout when all are 8-bit, else float32. Unless all were resized to one `size`, the
    files must share their size (their maps come back in it)."""
    sources = {source for _, source in chunk}
    if len(sources) > 1 and not resized:
        raise InputError(f"images have different sizes {sorted(sources)}; resize them to one "
                         f"size or pass each size in its own call")
    images = [image for image, _ in chunk]
    if all(image.dtype == torch.uint8 for image in images):
        hwc = [image.permute(1, 2, 0) for image in images]
        out = torch.empty(len(hwc), *hwc[0].shape, dtype=torch.uint8, pin_memory=pin)
        batch = torch.stack(hwc, out=out).permute(0, 3, 1, 2)
    else:
        out = torch.empty(len(images), *images[0].shape, pin_memory=pin)
        batch = torch.stack([as_float(image) for image in images], out=out)
    return Batch(batch, sources.pop() if len(sources) == 1 else None)


def _to_device(batches: Iterator[Batch], device) -> Iterator[Batch]:
    """Moves batches to `device`. On CUDA each (pinned) batch is copied on a side stream
    while the consumer still works on the previous one; the consumer's stream waits for
    that copy only (an event), not for the next."""
    if device is None or torch.device(device).type != "cuda":
        for batch in batches:
            yield batch if device is None else batch._replace(images=batch.images.to(device))
        return
    stream = torch.cuda.Stream(device)
    ahead = None
    for batch in batches:
        with torch.cuda.stream(stream):
            copied = batch._replace(images=batch.images.to(device, non_blocking=True))
            done = stream.record_event()
        if ahead is not None:
            yield _ready(*ahead)
        ahead = copied, done
    if ahead is not None:
        yield _ready(*ahead)


def _ready(batch: Batch, done: torch.cuda.Event) -> Batch:
    current = torch.cuda.current_stream(batch.images.device)
    current.wait_event(done)
    batch.images.record_stream(current)  # memory made on the side stream, used on this one
    return batch

"""Output paths of a command, checked before any work is done.

Every file a command will write is checked up front (`check_outputs`), so a wrong path
fails in a second, not after minutes of fitting, with a message naming the user's path:
    - a folder where a file is needed, or a file where a folder is needed;
    - a folder we cannot write in;
    - an input of the same command (never overwritten, not even with --force);
    - an existing file that is not a previous output of ours of the same kind (a model
      file, our JSON / table / CSV, a PNG tagged by report.write_image, our HTML report's
      index.html): replaced only with --force.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from PIL import Image

from ..data.mvtec import Category
from ..errors import InputError
from ..models.padim.serialization import is_model_file
from ..report import PNG_SOFTWARE
from ..report_html import HTML_GENERATOR

MAX_SNIFF = 1 << 20  # bytes of a text output read to recognise it


def check_outputs(outputs: dict[str | os.PathLike, str], inputs: Iterable[str | os.PathLike] = (),
                  force: bool = False) -> None:
    """Checks every output {path: kind} of one command; kind is a key of RECOGNISERS.

    Raises:
        InputError naming the path (see the module docstring).
    """
    input_ids = {_file_id(p) for p in inputs} - {None}
    outputs = {Path(path): kind for path, kind in outputs.items()}
    for folder, path in {path.parent: path for path in outputs}.items():
        check_writable_folder(folder, needed_for=path)
    for path, kind in outputs.items():
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give a file name")
        if not path.exists():
            continue
        if _file_id(path) in input_ids:
            raise InputError(f"{path}: is an input of this command; refusing to overwrite it")
        if not force and not RECOGNISERS[kind](path):
            raise InputError(f"{path}: exists and is not a {kind} written by stnpadim; "
                             "refusing to overwrite it (pass --force to replace it)")


def check_writable_folder(folder: str | os.PathLike, needed_for: str | os.PathLike | None = None) -> None:
    """`folder` exists as a writable folder, or can be created (its nearest existing
    ancestor is a writable folder). Creates nothing."""
    folder = Path(folder)
    shown = needed_for if needed_for is not None else folder
    existing = folder
    while not existing.exists() and existing != existing.parent:
        if existing.is_symlink():  # dangling link: mkdir would fail on it
            raise InputError(f"{existing}: is a broken link (needed for {shown})")
        existing = existing.parent
    if not existing.is_dir():
        needed = "" if existing == Path(shown) else f" (needed for {shown})"
        raise InputError(f"{existing}: is a file, not a folder{needed}")
    try:  # an unnamed file, gone when closed: leaves nothing behind, even if killed
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise InputError(f"{shown}: cannot write in {existing} ({exc.strerror or exc})") from None


def category_inputs(category: Category) -> list[Path]:
    """Every file of a category a command reads: training and test images, masks."""
    files = list(category.train_paths)
    for item in category.test_items:
        files += [item.path] + ([item.mask_path] if item.mask_path is not None else [])
    return files


def _file_id(path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _text_head(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_SNIFF).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _is_our_json(path: Path) -> bool:
    if path.stat().st_size > MAX_SNIFF:
        return False
    try:
        obj = json.loads(_text_head(path))
    except ValueError:
        return False
    return isinstance(obj, dict) and "categories" in obj and "mean" in obj


def _is_our_png(path: Path) -> bool:
    try:
        with Image.open(path, formats=["PNG"]) as img:
            return img.info.get("Software") == PNG_SOFTWARE
    except Exception:  # anything PIL cannot read is not ours
        return False


def _is_our_onnx(path: Path) -> bool:
    # ModelProto starts with ir_version then producer_name, which export sets to "stnpadim".
    try:
        with open(path, "rb") as f:
            return b"\x12\x08stnpadim" in f.read(32)
    except OSError:
        return False


RECOGNISERS = {
    "model file": is_model_file,
    "results JSON": _is_our_json,
    "markdown table": lambda path: _text_head(path).startswith("| category |"),
    "scores CSV": lambda path: _text_head(path).startswith("image,score"),
    "heatmap PNG": _is_our_png,
    "HTML report": lambda path: HTML_GENERATOR in _text_head(path),
    "ONNX model": _is_our_onnx,
}

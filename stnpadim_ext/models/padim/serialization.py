"""The model file: one torch.save'd dict of plain tensors, a JSON config and a format version.

    {"format": "stnpadim.padim", "version": 1, "config": "<json>", "tensors": {name: Tensor}}

The config holds the model's settings and its calibration (threshold, target rate, n,
held-out score quantiles; see calibration.py) under "calibration": an optional entry, so
version-1 files written before calibration existed still load, as uncalibrated models.

Only str / int / tensors inside, so `torch.load(weights_only=True)` reads it without running
any pickled code. Written through report.atomic_file (a temporary file in the target folder,
renamed over the target): an interrupted save leaves the old file (or none), never a broken
one, and the file gets the umask's permissions. `read_model_file` checks the container;
`model.load` validates every config value and tensor before building anything.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from ...errors import InputError
from ...report import atomic_file

FORMAT = "stnpadim.padim"
FORMAT_VERSION = 1


def write_model_file(path: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically writes config (JSON-serialisable) and tensors (moved to CPU) to `path`."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for the model")
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: no such folder to save the model in")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": json.dumps(config, sort_keys=True),
        "tensors": {name: t.detach().cpu().contiguous() for name, t in tensors.items()},
    }
    with atomic_file(path) as tmp:
        torch.save(payload, tmp)
    return path


def is_model_file(path: str | os.PathLike) -> bool:
    """True when `path` is a stnpadim model file (of any version); reads little (mmap)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # anything unreadable is not ours
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def read_model_file(path: str | os.PathLike, map_location="cpu") -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a file written by `write_model_file`; InputError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles are not for our users
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, random bytes...
        # In our words: torch's own message advises weights_only=False, i.e. running
        # whatever code a foreign file carries.
        raise InputError(f"{path}: not a stnpadim model file ({_unreadable(path, exc)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a stnpadim model file (no '{FORMAT}' format tag)")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise InputError(f"{path}: model file format version {version}, this stnpadim reads "
                         f"version {FORMAT_VERSION}; refit the model with this version")
    try:
        config = json.loads(payload["config"])
        tensors = dict(payload["tensors"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: damaged stnpadim model file ({type(exc).__name__}: {exc})") from None
    if not isinstance(config, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise InputError(f"{path}: damaged stnpadim model file (bad config or tensors)")
    return config, tensors


def _unreadable(path: Path, exc: Exception) -> str:
    """Why torch.load could not read `path`, in one complete phrase."""
    size = path.stat().st_size
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's container
    if is_zip and isinstance(exc, RuntimeError):
        return f"a damaged or truncated torch file of {size} bytes"
    if is_zip:  # readable container, but it holds objects other than plain tensors
        return "a torch file holding Python objects other than tensors and plain values, which are not loaded"
    return f"{size} bytes in no format torch.save writes"

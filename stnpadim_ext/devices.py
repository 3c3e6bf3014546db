"""Turning a user's `device` argument into a torch.device this machine has."""
from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(device=None, name: str = "device") -> torch.device:
    """`device` (None, str or torch.device) -> torch.device; None picks CUDA when available.

    Raises:
        InputError naming `name`: not a device string, a type other than cpu/cuda, CUDA
        asked for on a machine without it, or a CUDA index it does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise InputError(f"{name} must be a string such as 'cpu' or 'cuda:0', or a torch.device; "
                         f"got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"{name}: not a device: {device!r} (use cpu, cuda or cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"{name}: unsupported device {str(device)!r} (use cpu, cuda or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"{name}: {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"{name}: {device}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return dev

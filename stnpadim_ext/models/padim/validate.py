"""Checks of a model file's contents before anything is built from them (used by `load`).

A model file is data from disk, possibly edited or damaged: every config value is checked
for type and range, every tensor for name, dtype, shape and finiteness, the channel subset
for its index range. A bad file is an InputError, never a 49 GB allocation, a read of
uninitialised memory or NaN scores. The ranges of the PaDiM settings themselves are
checked by PaDiM.__init__; the STN's bounds are here (the STN class takes any size).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ...errors import InputError
from ..stn.network import PADDING_MODES, TRANSFORMS
from ..stn.poses import RANGE_KEYS
from ..stn.train import OBJECTIVES

CONFIG_KEYS = ("backbone", "n_features", "image_size", "center_crop", "seed", "eps", "sigma",
               "grid", "stn")
# Absent from files written before calibration / the STN's record existed (calibration is
# checked by Calibration.from_config).
OPTIONAL_CONFIG_KEYS = ("calibration", "stn_training")
# Bounds of the STN settings a model file may hold (defaults: 64, 16, 4 / 0.5, 0.5, 2.0).
STN_INTEGERS = {"loc_size": (16, 512), "width": (4, 256), "pool_size": (1, 16)}
STN_NUMBERS = {"max_translation": (0.0, 2.0), "max_log_scale": (0.0, 3.0), "highpass": (0.0, 16.0)}
# Bounds of pose ranges (train_stn's rotation, translation, scale).
POSE_RANGES = {"rotation": (0.0, 180.0), "translation": (0.0, 2.0), "scale": (1.0, 3.0)}
STN_RECORD_KEYS = ("objective", "ranges", "augment_padding", "symmetry", "alignment", "retries",
                   "accepted_weak")


def check_config(config: dict) -> None:
    """Keys of a model config and the STN part of it (PaDiM.__init__ checks the rest)."""
    missing = [k for k in CONFIG_KEYS if k not in config]
    unknown = sorted(set(config) - set(CONFIG_KEYS) - set(OPTIONAL_CONFIG_KEYS))
    if missing or unknown:
        raise InputError(f"config keys missing: {missing}, unknown: {unknown}")
    grid = config["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(v) and v >= 1 for v in grid)):
        raise InputError(f"config 'grid' must be two positive integers; got {grid!r}")
    if config["stn"] is not None:
        check_stn_config(config["stn"])
    if config.get("stn_training") is not None:
        check_stn_record(config["stn_training"])


def check_stn_config(stn: dict) -> None:
    """An STN config: exactly STN's keys, each of its type and within its bounds."""
    keys = {"transform", "padding_mode", *STN_INTEGERS, *STN_NUMBERS}
    if not isinstance(stn, dict) or set(stn) != keys:
        found = sorted(stn) if isinstance(stn, dict) else type(stn).__name__
        raise InputError(f"config 'stn' must hold {sorted(keys)}; got {found}")
    if stn["transform"] not in TRANSFORMS or stn["padding_mode"] not in PADDING_MODES:
        raise InputError(f"config 'stn': unknown transform {stn['transform']!r} or padding mode "
                         f"{stn['padding_mode']!r}")
    for key, (low, high) in STN_INTEGERS.items():
        if not (_is_int(stn[key]) and low <= stn[key] <= high):
            raise InputError(f"config 'stn.{key}' must be an integer in {low}..{high}; got {stn[key]!r}")
    for key, (low, high) in STN_NUMBERS.items():
        value = stn[key]
        if not (_is_number(value) and low <= value <= high):
            raise InputError(f"config 'stn.{key}' must be a number in [{low}, {high}]; got {value!r}")


def check_pose_ranges(ranges, name: str) -> None:
    """{"rotation", "translation", "scale"}: numbers within POSE_RANGES."""
    if not isinstance(ranges, dict) or set(ranges) != set(RANGE_KEYS):
        raise InputError(f"config '{name}' must hold {list(RANGE_KEYS)}; got {ranges!r}")
    for key, (low, high) in POSE_RANGES.items():
        if not (_is_number(ranges[key]) and low <= ranges[key] <= high):
            raise InputError(f"config '{name}.{key}' must be a number in [{low}, {high}]; "
                             f"got {ranges[key]!r}")


def check_stn_record(record) -> None:
    """What train_stn recorded about the STN (stn.record): its keys and their types."""
    if not isinstance(record, dict) or set(record) != set(STN_RECORD_KEYS):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise InputError(f"config 'stn_training' must hold {sorted(STN_RECORD_KEYS)}; got {found}")
    check_pose_ranges(record["ranges"], "stn_training.ranges")
    alignment = record["alignment"]
    ok = (record["objective"] in OBJECTIVES and record["augment_padding"] in PADDING_MODES
          and _is_int(record["symmetry"]) and record["symmetry"] >= 1
          and _is_int(record["retries"]) and record["retries"] >= 0
          and isinstance(record["accepted_weak"], bool) and isinstance(alignment, dict)
          and all(_is_number(v) or (isinstance(v, list) and all(_is_int(i) for i in v))
                  for v in alignment.values()))
    if not ok:
        raise InputError("config 'stn_training' holds a value of the wrong type or range")


def check_tensors(groups: dict[str, dict], expected: dict[str, dict]) -> None:
    """Each group's tensors against the expected ones (any tensors: only names, dtypes and
    shapes are compared): same names, dtypes, shapes; floating ones finite."""
    for prefix, want in expected.items():
        have = groups.get(prefix, {})
        missing, unknown = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        if missing or unknown:
            name = prefix + (missing or unknown)[0]
            raise InputError(f"tensor {name!r} is {'missing' if missing else 'unexpected'} "
                             f"({len(missing)} missing, {len(unknown)} unexpected)")
        for key, ref in want.items():
            tensor = have[key]
            if tensor.dtype != ref.dtype or tuple(tensor.shape) != tuple(ref.shape):
                raise InputError(f"tensor '{prefix}{key}' is {tensor.dtype} {list(tensor.shape)}; "
                                 f"expected {ref.dtype} {list(ref.shape)}")
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InputError(f"tensor '{prefix}{key}' holds NaN or Inf values")


def check_channel_subset(idx: torch.Tensor, total: int) -> None:
    """The embedding's channel indices: strictly increasing, within 0..total-1."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= total
                        or not bool((idx[1:] > idx[:-1]).all())):
        raise InputError(f"tensor 'embedding.idx' must hold increasing channel indices in "
                         f"0..{total - 1}")


def check_factor(factor_packed: torch.Tensor, dim: int) -> None:
    """The packed lower factor of each precision must have a positive diagonal."""
    rows = torch.arange(dim)
    if not bool((factor_packed[:, rows * (rows + 1) // 2 + rows] > 0).all()):
        raise InputError("tensor 'gaussian.factor_packed' is not a valid Cholesky factor "
                         "(non-positive diagonal)")


def gaussian_shapes(num_patches: int, dim: int) -> dict[str, torch.Tensor]:
    """Shape/dtype stand-ins (meta tensors: nothing allocated) of a PatchGaussian's state."""
    return {"mean": torch.empty(num_patches, dim, device="meta"),
            "factor_packed": torch.empty(num_patches, dim * (dim + 1) // 2, device="meta")}


def module_shapes(module: nn.Module | None) -> dict[str, torch.Tensor]:
    return {} if module is None else dict(module.state_dict())


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

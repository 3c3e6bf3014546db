"""Reports: heatmap overlay PNGs, scores CSV, results JSON and the Table-1-style table.

Every writer goes through `atomic_file`: the output is written to a temporary file beside
the target and renamed over it, so an interrupted run never leaves a half-written file.

Results dicts share one shape, the one `stnpadim eval --json` writes:
    {"categories": {category: {"image_auroc": float | None, ...}}, "mean": {...}}
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import matplotlib
import numpy as np
import torch
from PIL import Image, PngImagePlugin
from scipy import ndimage

from .errors import InputError
from .metrics import t_interval

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1")
# The columns of the printed table, as in the paper's Table 1 (plus AUPRO).
TABLE_METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
# The second table of `eval`: decisions at each model's calibrated threshold.
DECISION_METRICS = {"false_reject_rate": "false-reject rate", "miss_rate": "miss rate",
                    "precision": "precision", "recall": "recall", "f1_at_threshold": "F1"}

COLORMAP = "jet"  # dark blue (normal) ... dark red (anomalous)
# Heatmap colour range of a calibrated model, in units of its threshold: the same colour
# means the same normalized score in every run; 1.0 (the boundary) is the middle, green.
NORMALIZED_RANGE = (0.0, 2.0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; outputs get the permissions a plain open() would give.
_FILE_MODE = 0o666 & ~_umask()
PNG_SOFTWARE = "stnpadim"  # tEXt "Software" of our PNGs: tells our outputs from the user's files


# ----------------------------------------------------------------------------------------
# Writing files


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed onto `path` only if the block succeeds.

    The temporary is `.NAME.PID.XXXX.tmp`: one left by a process that no longer runs (killed
    mid-write) is removed by the next write to NAME. The file gets the umask's permissions
    (not mkstemp's 0600) and is flushed to disk before the rename. Creates the parent
    folders. A folder at `path`, or a parent that cannot be created, is an InputError naming it.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise InputError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, last: Iterable[str] = ()) -> Iterator[Path]:
    """Yields a hidden staging folder inside `folder`: the outputs of one run are written
    there and moved into `folder` only when the block succeeds (the names in `last` after
    the others), so they appear together or not at all. Stale staging folders of dead
    processes are removed like atomic_file's temporaries.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder / ".stage")
        stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(folder / ".stage"), suffix=".tmp",
                                      dir=folder))
    except OSError as exc:
        raise InputError(f"{folder}: cannot write here ({exc.strerror or exc})") from None
    try:
        yield stage
        last = set(last)
        for name in sorted(os.listdir(stage), key=lambda n: (n in last, n)):
            os.replace(stage / name, folder / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: Path) -> None:
    """Removes `.NAME.PID.*.tmp` files / folders beside `path` whose process PID is gone."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            stale = path.parent / name
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or no pid at all
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj) -> Path:
    """Writes `obj` as indented JSON (NaN written as null) to `path` atomically."""
    return write_text(path, json.dumps(_nan_to_none(obj), indent=2) + "\n")


def write_scores_csv(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Writes one CSV row per dict (columns: the first row's keys, in order) atomically."""
    rows = list(rows)
    if not rows:
        raise InputError(f"{path}: no scores to write")
    with atomic_file(path) as tmp:
        # surrogateescape: a file name that is not UTF-8 (x\xffy.png) keeps its bytes.
        with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return Path(path)


def write_image(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Writes a uint8 [H, W, 3] (RGB) or [H, W] (grey) array as a PNG (tagged Software:
    stnpadim), atomically."""
    with atomic_file(path) as tmp:
        _save_png(rgb, tmp)
    return Path(path)


def encode_png(rgb: np.ndarray) -> bytes:
    """The PNG `write_image` would write, as bytes."""
    buffer = io.BytesIO()
    _save_png(rgb, buffer)
    return buffer.getvalue()


def _save_png(rgb: np.ndarray, target) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", PNG_SOFTWARE)
    Image.fromarray(rgb).save(target, format="PNG", pnginfo=info)


# ----------------------------------------------------------------------------------------
# Heatmaps


def to_rgb8(image) -> np.ndarray:
    """float [3, H, W] in [0, 1] (tensor or array), or uint8 [H, W, 3] -> uint8 [H, W, 3]."""
    rgb = _numpy(image)
    if rgb.dtype == np.uint8:
        return rgb
    return np.rint(np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)


def colorize(amap, vmin: float, vmax: float) -> np.ndarray:
    """Anomaly map [H, W] -> uint8 [H, W, 3] jet colours, vmin blue ... vmax red."""
    amap = _numpy(amap).astype(np.float64)
    span = max(float(vmax) - float(vmin), 1e-12)
    t = np.clip((amap - vmin) / span, 0.0, 1.0)
    return matplotlib.colormaps[COLORMAP](t, bytes=True)[..., :3]


def heat_range(threshold: float) -> tuple[float, float]:
    """(vmin, vmax) of the heatmap colours of a model calibrated at `threshold` (NORMALIZED_RANGE)."""
    return NORMALIZED_RANGE[0] * threshold, NORMALIZED_RANGE[1] * threshold


def heatmap_overlay(image, amap, threshold: float | None, vmin: float, vmax: float
                    ) -> tuple[np.ndarray, np.ndarray | None]:
    """One image's heatmap as `score` writes it: the map resized to the image, blended on
    it and, for a calibrated model, the defect region (map > threshold) outlined in white.

    Args:
        image: float [3, H, W] in [0, 1] (the overlay's size: at most HEATMAP_MAX_SIDE).
        amap: anomaly map [h, w] in the input frame (any size; resized bilinearly).
        threshold: the model's calibrated threshold, or None (no region then).
        vmin, vmax: colour range (`heat_range(threshold)` for a calibrated model).

    Returns:
        (overlay uint8 [H, W, 3], defect region bool [H, W] or None).
    """
    amap = resize_map(amap.float(), image.shape[-2:])
    heat = overlay(image, amap, vmin, vmax)
    if threshold is None:
        return heat, None
    region = (amap > threshold).numpy()
    return outline(heat, region), region


def outline(rgb: np.ndarray, mask, colour=(255, 255, 255)) -> np.ndarray:
    """uint8 [H, W, 3] image with the boundary pixels of mask [H, W] (bool) set to `colour`."""
    mask = _numpy(mask).astype(bool)
    edge = mask & ~ndimage.binary_erosion(mask, border_value=0)
    out = rgb.copy()
    out[edge] = colour
    return out


def overlay(image, amap, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Blends the colorized map onto the image; returns uint8 [H, W, 3] at the image's size.

    Args:
        image: float [3, H, W] in [0, 1] (tensor or array) or uint8 [H, W, 3].
        amap: anomaly map [h, w] (bilinearly resized to H, W when different).
        vmin, vmax: colour range of the map.
        alpha: weight of the colour map, in [0, 1].
    """
    rgb = to_rgb8(image)
    heat = colorize(resize_map(amap, rgb.shape[:2]).numpy(), vmin, vmax).astype(np.float32)
    return _blend(rgb, heat, alpha)


def resize_map(amap, size: tuple[int, int]) -> torch.Tensor:
    """Anomaly map [h, w] (tensor or array) -> float32 tensor [*size], bilinear."""
    amap = torch.as_tensor(_numpy(amap), dtype=torch.float32)
    if tuple(amap.shape) == tuple(size):
        return amap
    return torch.nn.functional.interpolate(amap[None, None], size=tuple(size), mode="bilinear",
                                           align_corners=False)[0, 0]


def mask_overlay(image, mask, colour=(255, 0, 0), alpha: float = 0.5) -> np.ndarray:
    """The image with its ground-truth mask [H, W] (bool) tinted in `colour`: uint8 [H, W, 3]."""
    rgb = to_rgb8(image)
    mask = _numpy(mask).astype(bool)
    tint = np.where(mask[..., None], np.asarray(colour, np.float32), rgb.astype(np.float32))
    return _blend(rgb, tint, alpha)


def _blend(rgb: np.ndarray, other: np.ndarray, alpha: float) -> np.ndarray:
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * other
    return np.rint(blend).clip(0, 255).astype(np.uint8)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ----------------------------------------------------------------------------------------
# Results and the table


def summarize(categories: dict[str, dict]) -> dict:
    """{"categories": categories, "mean": per-key mean over categories (None values skipped)}."""
    keys = list(dict.fromkeys(k for metrics in categories.values() for k in metrics))
    mean = {}
    for key in keys:
        values = [m[key] for m in categories.values() if _is_number(m.get(key))]
        mean[key] = float(np.mean(values)) if values else None
    return {"categories": dict(categories), "mean": mean}


def aggregate_runs(runs: list[dict]) -> dict:
    """One metrics dict from several runs (seeds) of the same arm and category.

    Every numeric key becomes its mean over the runs, with <key>_sd (sample standard
    deviation, 0 for one run), <key>_ci95 ([low, high], the t-interval of the mean over
    the runs taken as independent, None for one run) and <key>_runs (the values). Keys
    that are None in some run aggregate the others; None in all runs stays None.
    """
    keys = list(dict.fromkeys(k for run in runs for k in run))
    out = {"n_runs": len(runs)}
    for key in keys:
        values = [run.get(key) for run in runs]
        numbers = [v for v in values if _is_number(v)]
        if not numbers:
            if all(v is None for v in values):
                out[key] = None
            continue
        out[key] = float(np.mean(numbers))
        out[f"{key}_sd"] = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0
        interval = t_interval(numbers)
        out[f"{key}_ci95"] = None if interval is None else list(interval)
        out[f"{key}_runs"] = numbers
    return out


def summarize_runs(categories: dict[str, list[dict]]) -> dict:
    """Results over several runs: {"categories": {c: aggregate_runs(runs)}, "mean": ...}.

    Run i of every category belongs to one seed; the mean row aggregates the per-seed
    means over categories (so its sd is the spread of the mean, not a mean of spreads).
    """
    n_runs = {len(runs) for runs in categories.values()}
    if len(n_runs) != 1:
        raise ValueError(f"every category needs the same number of runs; got {sorted(n_runs)}")
    means = [summarize({c: runs[i] for c, runs in categories.items()})["mean"]
             for i in range(n_runs.pop())]
    return {"categories": {c: aggregate_runs(runs) for c, runs in categories.items()},
            "mean": aggregate_runs(means)}


def markdown_table(arms: dict[str, dict], metrics: Iterable[str] = tuple(TABLE_METRICS),
                   groups: dict[str, list[str]] | None = None, digits: int = 3) -> str:
    """The Table-1-style comparison: one row per category, a column per metric and arm.

    Args:
        arms: {label: results} in column order, e.g. {"PaDiM": ..., "STN+PaDiM": ...};
            each results dict as written by `summarize`. A metric with a <metric>_sd
            beside it (results over several seeds) prints as "mean ± sd".
        metrics: metric keys to show (TABLE_METRICS and DECISION_METRICS give headers).
        groups: optional {name: categories} adding a mean row per group (e.g. textures,
            objects) before the overall mean row.
        digits: decimals shown.

    Returns:
        GitHub markdown, ending with a newline.
    """
    metrics = list(metrics)
    labels = list(arms)
    categories = list(dict.fromkeys(c for r in arms.values() for c in r["categories"]))
    names = {**TABLE_METRICS, **DECISION_METRICS}
    header = ["category"] + [f"{names.get(m, m)} {label}" for m in metrics for label in labels]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]

    def row(name: str, values_of) -> str:
        cells = [_fmt(values_of(label).get(m), digits, values_of(label).get(f"{m}_sd"))
                 for m in metrics for label in labels]
        return "| " + " | ".join([name] + cells) + " |"

    for category in categories:
        lines.append(row(category, lambda label, c=category: arms[label]["categories"].get(c, {})))
    for name, members in (groups or {}).items():
        present = [c for c in members if c in categories]
        if present:
            lines.append(row(f"mean ({name})", lambda label, present=present: summarize(
                {c: arms[label]["categories"][c] for c in present
                 if c in arms[label]["categories"]})["mean"]))
    lines.append(row("**mean**", lambda label: arms[label]["mean"]))
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int, sd=None) -> str:
    if not _is_number(value):
        return "n/a"
    return f"{value:.{digits}f} ± {sd:.{digits}f}" if _is_number(sd) else f"{value:.{digits}f}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _nan_to_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj

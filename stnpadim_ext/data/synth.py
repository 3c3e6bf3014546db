"""Synthetic MVTec-AD-format data sets: procedural textures and a machined part, with defects.

    from stnpadim_ext.data.synth import make_dataset
    make_dataset("/tmp/synth", categories=["fabric", "part_drift"], seed=0)

writes, per category, exactly the MVTec AD layout (ROOT/CAT/train/good/000.png,
ROOT/CAT/test/<defect>/000.png, ROOT/CAT/ground_truth/<defect>/000_mask.png with 0/255
L-mode masks) plus ROOT/CAT/meta.json holding the category spec and every image's pose,
and, when asked (n_calibration), ROOT/CAT/calibration/good/000.png: good images posed like
the test images, as a user would collect from the line to calibrate a threshold.

Everything is rendered analytically from coordinates (textures from random Fourier fields,
the part from a signed distance function), so a pose is an exact change of coordinates:
no resampling blur, and the recorded pose is the true one. Each image draws from its own
seed (seed, category, split, defect type, index), so a file does not depend on which other
categories or counts were asked for, and the same seed gives the same bytes.

Pose convention (also written into meta.json): `angle` in degrees, counter-clockwise as seen
on screen, about the image centre; `shift` = [dx, dy] in pixels (x right, y down) of the
object origin from the image centre; `scale` the object's size factor; `theta` is the 2x3
matrix in the normalised coordinates of `affine_grid(align_corners=False)` mapping the
canonical frame into the image, so `affine_sample(image, theta)` shows the object in its
canonical pose. `perspective` = [a, b] (drift_scale only, else [0, 0]): the image point q
(normalised) shows what the affine pose puts at q / (1 + a q_x + b q_y); theta is the
affine part only.
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..errors import InputError

DEFECTS = ("scratch", "hole", "stain", "cut_paste")
# Largest image side: the generator holds a few float64 arrays of the image (~0.1 GB each at 4096).
MAX_IMAGE_SIZE = 4096

# pose modes: how each split is posed. "aligned" still jitters by a pixel or a degree, as a
# real fixture does; "drift" moves only the test images (good and defective alike);
# "drift_wide" drifts further than the reconstruct STN is trained for (+-40 deg);
# "drift_scale" adds a scale change and a mild perspective tilt to the drift.
POSE_MODES = {
    "aligned": {"train": "jitter", "test": "jitter"},
    "drift": {"train": "jitter", "test": "drift"},
    "drift_wide": {"train": "jitter", "test": "drift_wide"},
    "drift_scale": {"train": "jitter", "test": "drift_scale"},
    "random": {"train": "random", "test": "random"},
}
JITTER_DEG, JITTER_PX = 1.0, 1.0
DRIFT_DEG = 30.0
DRIFT_WIDE_DEG = 60.0
SCALE_CHANGE = 0.15     # "drift_scale": scale factor uniform in [1 - 0.15, 1 + 0.15]
PERSPECTIVE = 0.08      # "drift_scale": projective coefficients uniform in [-0.08, 0.08]
SHIFT_FRACTION = 0.04  # of the image size, for the drifting and random modes

# Harder part variants (options of the "part" family): lighting "scene" is fixed in the
# image frame and does not turn with the part; shape "link" has 2-fold rotational symmetry
# (its canonical pose is ambiguous); clutter puts random objects on the background;
# defects "edge" go near the image border and corners instead of onto the part: where an
# aligning STN turns the image out of view.
CATEGORIES = {
    "fabric": {"kind": "texture", "family": "fabric", "pose": "aligned"},
    "grain": {"kind": "texture", "family": "grain", "pose": "aligned"},
    "mesh": {"kind": "texture", "family": "mesh", "pose": "aligned"},
    "part_aligned": {"kind": "object", "family": "part", "pose": "aligned"},
    "part_drift": {"kind": "object", "family": "part", "pose": "drift"},
    "part_random": {"kind": "object", "family": "part", "pose": "random"},
    "part_wide": {"kind": "object", "family": "part", "pose": "drift_wide"},
    "part_scale": {"kind": "object", "family": "part", "pose": "drift_scale"},
    "part_lit": {"kind": "object", "family": "part", "pose": "drift", "lighting": "scene"},
    "part_sym": {"kind": "object", "family": "part", "pose": "random", "shape": "link"},
    "part_clutter": {"kind": "object", "family": "part", "pose": "drift", "clutter": True},
    "part_edge": {"kind": "object", "family": "part", "pose": "drift", "defects": "edge"},
}
# "edge" defects: in the image's outer band, beyond this radius (normalised: 1 = half the
# side, so the band holds the corners and a strip along each side).
EDGE_RADIUS = 0.85

POSE_CONVENTION = (
    "angle: degrees, counter-clockwise on screen, about the image centre; shift: [dx, dy] "
    "pixels (x right, y down) of the object origin from the image centre; theta: 2x3 "
    "affine_grid matrix (normalised coordinates, align_corners=False) mapping the canonical "
    "frame into this image, so grid_sample(image, affine_grid(theta)) is the canonical pose; "
    "scale: size factor (in theta); perspective: [a, b], image point q shows the affine pose's "
    "q / (1 + a q_x + b q_y) (not in theta)")


# ----------------------------------------------------------------------------------------
# Public entry point


def make_dataset(root: str | os.PathLike, categories=None, seed: int = 0, image_size: int = 128,
                 n_train: int = 40, n_test_good: int = 8, n_test_defect: int = 4,
                 pose: str | dict | None = None, overwrite: bool = False,
                 progress: bool = True, n_calibration: int = 0) -> list[str]:
    """Writes a synthetic MVTec-format data set under `root`, deterministic by `seed`.

    Args:
        root: output folder (created if needed).
        categories: names from CATEGORIES (default: all).
        seed: same seed, same arguments -> byte-identical files.
        image_size: side of the square images in pixels, 32..MAX_IMAGE_SIZE.
        n_train: good training images per category.
        n_test_good: good test images per category.
        n_test_defect: test images per defect type (DEFECTS) per category.
        pose: None (each category's own mode), one of POSE_MODES for all categories, or a
            dict {category: mode} overriding some of them.
        overwrite: replace category folders previously written by this generator (a
            folder holding anything else is never touched).
        progress: show a tqdm bar.
        n_calibration: good "line" images per category in the test split's pose mode,
            written to CAT/calibration/good/ (none by default).

    Returns:
        The category names written, in order; each is at root/<name>.
    """
    names = _check_args(categories, image_size, n_train, n_test_good, n_test_defect, n_calibration)
    modes = _pose_modes(names, pose)
    root = Path(root)
    for name in names:
        _check_target(root / name, overwrite)
    root.mkdir(parents=True, exist_ok=True)
    total = len(names) * (n_train + n_test_good + n_test_defect * len(DEFECTS) + n_calibration)
    # The small matmuls in _Field run ~10x slower on a busy machine with threaded BLAS.
    with tqdm(total=total, desc="synth", unit="img", disable=not progress) as bar, \
            threadpool_limits(1, user_api="blas"):
        for name in names:
            # Build beside the target and move it in at the end: never a half-written category.
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                _write_category(tmp, name, modes[name], seed, image_size,
                                (n_train, n_test_good, n_test_defect, n_calibration), bar)
                _move_into_place(tmp, root / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return names


def _move_into_place(tmp: Path, target: Path) -> None:
    """Renames the finished folder `tmp` to `target`, replacing what is there.

    Only renames touch `target`: the old folder is first renamed aside (then deleted), so
    concurrent runs writing the same category never delete files under each other's feet;
    the last one to finish wins.
    """
    for _ in range(100):
        if target.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            try:
                target.rename(aside / target.name)
            except FileNotFoundError:  # another run moved it first
                pass
            finally:
                shutil.rmtree(aside, ignore_errors=True)
        try:
            tmp.rename(target)
            return
        except OSError as exc:  # another run put its folder there in the meantime: again
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise InputError(f"{target}: could not be replaced (other processes keep writing it)")


def _check_args(categories, image_size, *counts) -> list[str]:
    if categories is None:
        names = list(CATEGORIES)
    else:
        names = [categories] if isinstance(categories, str) else list(categories)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown or not names:
        raise InputError(f"unknown synthetic categories {unknown}; choose from {list(CATEGORIES)}")
    if len(set(names)) != len(names):
        raise InputError(f"categories listed twice: {names}")
    if not isinstance(image_size, int) or not 32 <= image_size <= MAX_IMAGE_SIZE:
        raise InputError(f"image_size must be an integer in 32..{MAX_IMAGE_SIZE}; got {image_size!r}")
    if any(not isinstance(c, int) or c < 0 for c in counts) or counts[0] < 1:
        raise InputError(f"n_train must be >= 1 and the other counts >= 0; got {counts}")
    return names


def _pose_modes(names: list[str], pose) -> dict[str, str]:
    modes = {n: CATEGORIES[n]["pose"] for n in names}
    if isinstance(pose, str):
        modes = {n: pose for n in names}
    elif isinstance(pose, dict):
        modes.update({n: m for n, m in pose.items() if n in modes})
    elif pose is not None:
        raise InputError(f"pose must be None, a mode name or a dict; got {type(pose).__name__}")
    bad = sorted({m for m in modes.values() if m not in POSE_MODES})
    if bad:
        raise InputError(f"unknown pose modes {bad}; choose from {list(POSE_MODES)}")
    return modes


def _check_target(folder: Path, overwrite: bool) -> None:
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    # A concurrent run may be swapping the folder (gone for an instant): look twice.
    ours = _is_synthetic(folder) or not folder.exists() or _is_synthetic(folder)
    if not ours:
        raise InputError(f"{folder}: exists and is not a synthetic set written by stnpadim; "
                         "refusing to overwrite it")
    if not overwrite:
        raise InputError(f"{folder}: already exists; pass overwrite=True (CLI: --force) to replace it")


def _is_synthetic(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("generator") == "stnpadim synth"


# ----------------------------------------------------------------------------------------
# Writing one category


def _write_category(out: Path, name: str, mode: str, seed: int, size: int, counts, bar) -> None:
    n_train, n_test_good, n_test_defect, n_calibration = counts
    family = _family(name, seed, size)
    images = {}
    jobs = [("train", "good", i) for i in range(n_train)]
    jobs += [("test", "good", i) for i in range(n_test_good)]
    jobs += [("test", d, i) for d in DEFECTS for i in range(n_test_defect)]
    jobs += [("calibration", "good", i) for i in range(n_calibration)]
    for split, kind, i in jobs:
        rng = _rng(seed, name, split, kind, i)
        posed_like = "test" if split == "calibration" else split  # line images drift like the test
        angle, shift, scale, perspective = _sample_pose(rng, POSE_MODES[mode][posed_like], size)
        sample = family.render(rng, angle, shift, scale, perspective)
        rel = f"{split}/{kind}/{i:03d}.png"
        entry = {"angle": round(angle, 6), "shift": [round(shift[0], 6), round(shift[1], 6)],
                 "scale": round(scale, 6), "perspective": [round(p, 6) for p in perspective],
                 "theta": _theta(angle, shift, size, scale), "defect": None, "mask": None}
        image = sample.image
        if kind != "good":
            image, mask = _add_defect(kind, sample, family, rng)
            mask_rel = f"ground_truth/{kind}/{i:03d}_mask.png"
            _save(out / mask_rel, mask.astype(np.uint8) * 255)
            entry.update(defect=kind, mask=mask_rel, defect_pixels=int(mask.sum()))
        _save(out / rel, _to_uint8(image))
        images[rel] = entry
        bar.update(1)
    meta = {"generator": "stnpadim synth", "version": 1, "category": name, "seed": seed,
            "image_size": size, "spec": {**CATEGORIES[name], "pose": mode},
            "defects": list(DEFECTS), "pose_convention": POSE_CONVENTION, "images": images}
    (out / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def _rng(seed: int, name: str, *key) -> np.random.Generator:
    words = [zlib.crc32(str(k).encode()) for k in (name, *key)]
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=words))


def _sample_pose(rng: np.random.Generator, kind: str, size: int):
    """(angle, (dx, dy), scale, (a, b)) of one image; see POSE_CONVENTION."""
    if kind == "jitter":
        deg, shift = JITTER_DEG, JITTER_PX
        angle = rng.uniform(-deg, deg)
    else:
        shift = SHIFT_FRACTION * size
        deg = {"drift": DRIFT_DEG, "drift_scale": DRIFT_DEG, "drift_wide": DRIFT_WIDE_DEG}.get(kind, 180.0)
        angle = rng.uniform(-deg, deg)
    dx, dy = rng.uniform(-shift, shift, size=2)
    scale, perspective = 1.0, (0.0, 0.0)
    if kind == "drift_scale":  # drawn after the rest: the other modes' draws stay as they were
        scale = rng.uniform(1.0 - SCALE_CHANGE, 1.0 + SCALE_CHANGE)
        perspective = tuple(float(p) for p in rng.uniform(-PERSPECTIVE, PERSPECTIVE, size=2))
    return float(angle), (float(dx), float(dy)), float(scale), perspective


def _theta(angle: float, shift, size: int, scale: float = 1.0) -> list[list[float]]:
    c, s = scale * math.cos(math.radians(angle)), scale * math.sin(math.radians(angle))
    tx, ty = (2.0 * shift[0] / size, 2.0 * shift[1] / size)
    return [[round(c, 8), round(s, 8), round(tx, 8)], [round(-s, 8), round(c, 8), round(ty, 8)]]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


# ----------------------------------------------------------------------------------------
# Rendering: coordinates, Fourier fields, families


class _Sample:
    """One rendered good image [H, W, 3] in [0, 1] and where defects may go.

    `region` is where a defect may change pixels (the whole image for textures, the
    object's interior for objects); `sdf` is the signed distance to the object edge in
    pixels (negative inside), None for textures.
    """

    def __init__(self, image, region, sdf=None):
        self.image, self.region, self.sdf = image, region, sdf


class _Grid:
    """The pixel grid of one image in canonical-frame coordinates: p_can = R^T (q - t) / s
    with q = p_img / (1 + a x_img + b y_img), p_img the normalised pixel centre
    (align_corners=False), R = [[c, s], [-s, c]] (counter-clockwise on screen, y down), s
    the scale, (a, b) the perspective. Without perspective an affine map of the pixel
    indices (`affine`), which _Field exploits.
    """

    def __init__(self, size: int, angle: float = 0.0, shift=(0.0, 0.0), scale: float = 1.0,
                 perspective=(0.0, 0.0)):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        step = 2.0 / size
        x0 = step / 2 - 1.0 - 2.0 * shift[0] / size  # pixel (0, 0), image frame, minus t
        y0 = step / 2 - 1.0 - 2.0 * shift[1] / size
        self.size, self.perspective = size, tuple(perspective)
        self.affine = self.perspective == (0.0, 0.0)
        self._pose = (c, s, 2.0 * shift[0] / size, 2.0 * shift[1] / size, scale)
        self.origin = ((c * x0 - s * y0) / scale, (s * x0 + c * y0) / scale)
        self.d_col = (c * step / scale, s * step / scale)  # canonical step of one column
        self.d_row = (-s * step / scale, c * step / scale)

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Canonical coordinates of every pixel, [size, size] each (rows = image y)."""
        idx = np.arange(self.size, dtype=np.float64)
        col, row = idx[None, :], idx[:, None]
        if self.affine:
            x = self.origin[0] + self.d_col[0] * col + self.d_row[0] * row
            y = self.origin[1] + self.d_col[1] * col + self.d_row[1] * row
            return x.astype(np.float32), y.astype(np.float32)
        c, s, tx, ty, scale = self._pose
        qx, qy = (col + 0.5) * 2.0 / self.size - 1.0, (row + 0.5) * 2.0 / self.size - 1.0
        w = 1.0 + self.perspective[0] * qx + self.perspective[1] * qy
        px, py = qx / w - tx, qy / w - ty
        x, y = (c * px - s * py) / scale, (s * px + c * py) / scale
        return x.astype(np.float32), y.astype(np.float32)


class _Field:
    """Smooth random field: a sum of cosines with random wave vectors, roughly unit variance.

    Frequencies are in cycles per unit of normalised coordinate; `stretch` scales them per
    axis (anisotropic fields: brushed metal, wood fibres). On a grid the phase of each wave
    is affine in (row, col), so the sum factorises into one small complex matmul
    [size, n] @ [n, size] instead of size^2 * n cosines.
    """

    def __init__(self, rng, n: int, f_lo: float, f_hi: float, stretch=(1.0, 1.0)):
        radius = rng.uniform(f_lo, f_hi, n)
        direction = rng.uniform(0.0, 2.0 * math.pi, n)
        self.k = 2.0 * math.pi * np.stack([radius * np.cos(direction) * stretch[0],
                                            radius * np.sin(direction) * stretch[1]])
        self.phase = rng.uniform(0.0, 2.0 * math.pi, n)
        self.amp = rng.normal(size=n) * math.sqrt(2.0 / n)

    def __call__(self, grid: _Grid, offset=(0.0, 0.0)) -> np.ndarray:
        """Field at the grid's canonical coordinates + offset, float32 [size, size]."""
        kx, ky = self.k
        if not grid.affine:  # perspective: no factorisation, one cosine per pixel and wave
            x, y = grid.xy()
            phase = ((x[..., None] + offset[0]) * kx + (y[..., None] + offset[1]) * ky + self.phase)
            return (np.cos(phase) @ self.amp).astype(np.float32)
        start = kx * (grid.origin[0] + offset[0]) + ky * (grid.origin[1] + offset[1]) + self.phase
        per_col = kx * grid.d_col[0] + ky * grid.d_col[1]
        per_row = kx * grid.d_row[0] + ky * grid.d_row[1]
        idx = np.arange(grid.size)[:, None]
        rows = (self.amp * np.exp(1j * (start + per_row * idx))).astype(np.complex64)  # [S, n]
        cols = np.exp(1j * (per_col * idx)).T.astype(np.complex64)  # [n, S]
        return (rows @ cols).real


def _family(name: str, seed: int, size: int):
    spec = CATEGORIES[name]
    rng = _rng(seed, name, "family")
    if spec["family"] == "part":
        return _Part(rng, size, shape=spec.get("shape", "bracket"),
                     lighting=spec.get("lighting", "part"), clutter=spec.get("clutter", False),
                     defects=spec.get("defects", "part"))
    return {"fabric": _Fabric, "grain": _Grain, "mesh": _Mesh}[spec["family"]](rng, size)


class _Texture:
    """Base for textures: a random offset per image makes each a different piece of cloth,
    wood or mesh; the pose rotates the texture coordinates."""

    kind = "texture"

    def __init__(self, rng, size: int):
        self.size = size
        self.noise = 0.008  # sensor noise, std

    def render(self, rng, angle: float, shift, scale: float = 1.0, perspective=(0.0, 0.0)) -> _Sample:
        grid = _Grid(self.size, angle, shift, scale, perspective)
        image = self.shade(grid, tuple(rng.uniform(-50.0, 50.0, size=2)))
        image = image + rng.normal(0.0, self.noise, image.shape).astype(np.float32)
        return _Sample(np.clip(image, 0.0, 1.0), np.ones(image.shape[:2], bool))

    def shade(self, grid: _Grid, offset) -> np.ndarray:
        """Noise-free texture [size, size, 3] on the grid, shifted by offset."""
        raise NotImplementedError


class _Fabric(_Texture):
    """Plain-weave cloth: alternating over/under threads, wavy, with per-thread tint."""

    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.period = 2.0 / 18.0  # thread spacing in normalised units: 18 threads per side
        self.warp = _Field(rng, 16, 0.3, 1.2)
        self.weft = _Field(rng, 16, 0.3, 1.2)
        self.fibre = _Field(rng, 48, 12.0, 30.0)
        self.colours = np.array([[0.35, 0.42, 0.55], [0.30, 0.36, 0.48]], np.float32)
        self.colours *= rng.uniform(0.9, 1.1, size=(1, 3)).astype(np.float32)
        self.thread_tint = rng.uniform(0.85, 1.15, size=64).astype(np.float32)

    def shade(self, grid, offset):
        x, y = grid.xy()
        u = (x + offset[0] + 0.25 * self.period * self.warp(grid, offset)) / self.period
        v = (y + offset[1] + 0.25 * self.period * self.weft(grid, offset)) / self.period
        iu, iv = np.floor(u), np.floor(v)
        fu, fv = u - iu, v - iv
        over = ((iu + iv) % 2) == 0  # warp thread on top in these cells
        warp = np.sin(math.pi * fu) ** 0.6 * (0.85 + 0.15 * np.cos(2 * math.pi * (fv - 0.5)))
        weft = np.sin(math.pi * fv) ** 0.6 * (0.85 + 0.15 * np.cos(2 * math.pi * (fu - 0.5)))
        value = np.where(over, warp, weft)
        tint = np.where(over, self.thread_tint[iu.astype(np.int64) % 64],
                        self.thread_tint[iv.astype(np.int64) % 64])
        value = value * tint * (1.0 + 0.08 * self.fibre(grid, offset))
        colour = np.where(over[..., None], self.colours[0], self.colours[1])
        return (0.25 + 1.1 * value[..., None]) * colour


class _Grain(_Texture):
    """Wood: growth rings bent by a smooth field, fine fibres along the grain, knots of
    colour."""

    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.bend = _Field(rng, 16, 0.1, 0.5, stretch=(1.0, 0.5))
        self.ring_noise = _Field(rng, 24, 0.5, 2.0, stretch=(0.5, 1.0))
        self.fibre = _Field(rng, 64, 10.0, 40.0, stretch=(0.08, 1.0))
        self.rings = rng.uniform(5.0, 7.0)  # rings per unit
        self.light = np.array([0.78, 0.60, 0.40], np.float32) * rng.uniform(0.95, 1.05)
        self.dark = np.array([0.50, 0.32, 0.18], np.float32) * rng.uniform(0.95, 1.05)

    def shade(self, grid, offset):
        _, y = grid.xy()
        yy = y + offset[1] + 0.12 * self.bend(grid, offset)
        ring = 0.5 + 0.5 * np.sin(2 * math.pi * self.rings * yy + 0.5 * self.ring_noise(grid, offset))
        value = np.clip(0.75 * ring ** 3 + 0.12 * self.fibre(grid, offset) + 0.1, 0.0, 1.0)
        return self.light + (self.dark - self.light) * value[..., None]


class _Mesh(_Texture):
    """Wire mesh on a dark ground: a slightly wavy square grid of bright rounded wires."""

    def __init__(self, rng, size):
        super().__init__(rng, size)
        self.period = 2.0 / 10.0
        self.wave = _Field(rng, 12, 0.3, 1.0)
        self.shine = _Field(rng, 32, 4.0, 12.0)
        self.wire = np.array([0.72, 0.72, 0.70], np.float32) * rng.uniform(0.95, 1.05)
        self.ground = np.array([0.10, 0.11, 0.12], np.float32)

    def shade(self, grid, offset):
        x, y = grid.xy()
        w = 0.08 * self.period * self.wave(grid, offset)
        u = (x + offset[0] + w) / self.period
        v = (y + offset[1] - w) / self.period
        du, dv = np.abs(u - np.rint(u)), np.abs(v - np.rint(v))  # 0 on a wire's axis
        half = 0.13
        across = np.clip(1.0 - np.minimum(du, dv) / half, 0.0, 1.0)
        value = np.sqrt(across) * (0.85 + 0.1 * self.shine(grid, offset))
        return self.ground + (self.wire - self.ground) * value[..., None]


class _Part:
    """A machined part (brushed surface) on a mildly textured ground, drawn from its signed
    distance function.

    shape "bracket": an L-bracket with two holes, a notch and an engraved mark; no rotation
    or mirror maps it onto itself. shape "link": a Z-shaped link with two holes, the same
    after a half turn (2-fold rotational symmetry, surface included), not mirror-symmetric.
    lighting "part": a painted shading gradient that turns with the part; "scene": a strong
    light gradient fixed in the image frame instead, over part and ground alike.
    clutter: 3-6 random discs and bars on the ground of each image (under the part, never
    on it, so defect masks stay exact).
    defects "part": on the part's interior; "edge": anywhere in the image's outer band
    (beyond EDGE_RADIUS from the centre), mostly on the ground.

    In the canonical frame (normalised units) the part fits in a disc of radius 0.78, so
    with a shift of at most SHIFT_FRACTION of the size it stays inside the frame at any
    angle (and at 1.15x scale, in the drift_scale range of angles).
    """

    kind = "object"

    def __init__(self, rng, size, shape: str = "bracket", lighting: str = "part",
                 clutter: bool = False, defects: str = "part"):
        self.size, self.shape, self.lighting, self.clutter = size, shape, lighting, clutter
        self.defects = defects
        self.brush = _Field(rng, 48, 25.0, 60.0, stretch=(0.05, 1.0))
        self.ground_field = _Field(rng, 24, 0.5, 2.0)
        self.ground_fine = _Field(rng, 48, 20.0, 40.0)
        self.metal = np.array([0.66, 0.64, 0.60], np.float32)
        self.ground = np.array([0.20, 0.22, 0.26], np.float32)
        self.light = np.array([-0.6, -0.8], np.float32)  # light from the top left, image frame

    def sdf(self, x, y) -> np.ndarray:
        """Signed distance (normalised units, negative inside) in the canonical frame."""
        if self.shape == "link":
            body = _box(x, y, (0.0, 0.0), (0.55, 0.24), 0.08)
            arms = np.minimum(_box(x, y, (0.36, 0.27), (0.14, 0.2), 0.06),
                              _box(x, y, (-0.36, -0.27), (0.14, 0.2), 0.06))
            holes = np.minimum(_circle(x, y, (-0.38, 0.0), 0.08), _circle(x, y, (0.38, 0.0), 0.08))
            return np.maximum(np.minimum(body, arms), -holes)
        body = _box(x, y, (-0.10, 0.0), (0.55, 0.24), 0.08)
        arm = _box(x, y, (0.30, 0.26), (0.16, 0.38), 0.08)
        d = np.minimum(body, arm)
        holes = np.minimum(_circle(x, y, (-0.43, 0.0), 0.10), _circle(x, y, (0.30, 0.46), 0.065))
        notch = _box(x, y, (0.02, -0.26), (0.05, 0.09), 0.0)
        return np.maximum(d, -np.minimum(holes, notch))

    def render(self, rng, angle: float, shift, scale: float = 1.0, perspective=(0.0, 0.0)) -> _Sample:
        size = self.size
        grid = _Grid(size, angle, shift, scale, perspective)
        x, y = grid.xy()
        px = size / 2.0 * scale  # pixels per normalised canonical unit
        sdf = self.sdf(x, y) * px
        # ground: mild illumination gradient and grain, the part's soft shadow
        still = _Grid(size)
        ground = 1.0 + 0.06 * self.ground_field(still) + 0.03 * self.ground_fine(still)
        xs, ys = _Grid(size, angle, (shift[0] - 0.02 * size, shift[1] - 0.025 * size), scale,
                       perspective).xy()
        shadow = np.clip(0.5 - self.sdf(xs, ys) * px / (0.04 * size), 0.0, 1.0)
        back = self.ground * (ground * (1.0 - 0.45 * shadow))[..., None]
        if self.clutter:
            back = _add_clutter(back, rng)
        # metal: brushed along the part's long axis, a painted shading gradient, an engraved
        # mark and a lit bevel along the edge (its look depends on the pose, as in reality)
        gain = rng.uniform(0.97, 1.03)
        if self.shape == "link":  # symmetric surface: the brush and its half-turned copy
            turned = _Grid(size, angle + 180.0, shift, scale, perspective)
            metal = gain * (0.92 + 0.025 * (self.brush(grid) + self.brush(turned)))
        else:
            painted = 0.08 * x - 0.05 * y if self.lighting == "part" else 0.0
            metal = gain * (0.92 + 0.035 * self.brush(grid) + painted)
            mark = _box(x, y, (-0.12, 0.11), (0.14, 0.022), 0.01) * px
            metal = metal * (1.0 - 0.25 * np.clip(0.5 - mark, 0.0, 1.0))
        gy, gx = np.gradient(sdf)
        facing = (gx * self.light[0] + gy * self.light[1]) / (np.hypot(gx, gy) + 1e-6)
        bevel = np.clip(1.0 + sdf / max(1.5, 0.025 * size), 0.0, 1.0)
        metal = metal * (1.0 - 0.3 * bevel * facing)
        front = self.metal * metal[..., None]
        cover = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
        image = back * (1.0 - cover) + front * cover
        if self.lighting == "scene":  # a lamp at the left: +-25% across the image, fixed
            ix, iy = _Grid(size).xy()
            image = image * (1.0 - 0.25 * ix + 0.1 * iy)[..., None]
        image = image + rng.normal(0.0, 0.008, image.shape).astype(np.float32)
        image = np.clip(image, 0.0, 1.0).astype(np.float32)
        if self.defects == "edge":  # the outer band of the image frame, part or ground
            ix, iy = _Grid(size).xy()
            return _Sample(image, np.hypot(ix, iy) > EDGE_RADIUS)
        interior = sdf < -1.5  # pixels a defect may touch: well inside, off the anti-aliased rim
        return _Sample(image, interior, sdf)


def _add_clutter(back: np.ndarray, rng) -> np.ndarray:
    """3-6 random discs and bars (grey or tinted, 4-12% of the side) painted on `back`."""
    size = back.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = back.copy()
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0, size, size=2)
        radius = rng.uniform(0.04, 0.12) * size
        if rng.uniform() < 0.5:
            inside = np.hypot(xx - cx, yy - cy) < radius
        else:
            turn = rng.uniform(0.0, math.pi)
            u = math.cos(turn) * (xx - cx) + math.sin(turn) * (yy - cy)
            v = -math.sin(turn) * (xx - cx) + math.cos(turn) * (yy - cy)
            inside = (np.abs(u) < radius) & (np.abs(v) < 0.25 * radius)
        out[inside] = rng.uniform(0.1, 0.6) * rng.uniform(0.8, 1.2, size=3).astype(np.float32)
    return out


def _box(x, y, centre, half, r):
    qx = np.abs(x - centre[0]) - half[0] + r
    qy = np.abs(y - centre[1]) - half[1] + r
    return np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0)) + np.minimum(np.maximum(qx, qy), 0.0) - r


def _circle(x, y, centre, r):
    return np.hypot(x - centre[0], y - centre[1]) - r


# ----------------------------------------------------------------------------------------
# Defects: each returns the defective image and its exact binary mask


def _add_defect(kind: str, sample: _Sample, family, rng) -> tuple[np.ndarray, np.ndarray]:
    size = sample.image.shape[0]
    for _ in range(50):
        image, drawn = _DEFECT_FUNCS[kind](sample, family, rng, size)
        mask = drawn & sample.region
        # keep defects visible: redraw when too little of it landed inside the allowed area
        if mask.sum() >= max(6, 0.0006 * size * size, 0.5 * drawn.sum()):
            out = sample.image.copy()
            out[mask] = image[mask]
            return out, mask
    raise RuntimeError(f"could not place a {kind} defect")  # not reached for the shipped families


def _centre(sample: _Sample, rng, margin: float) -> tuple[float, float]:
    """A pixel position (x, y) where a defect of radius `margin` px fits."""
    size = sample.image.shape[0]
    if sample.sdf is not None:
        ok = sample.sdf < -max(2.0, margin)
        if not ok.any():
            ok = sample.region
    else:  # anywhere in the region, margin pixels from the image border
        ok = np.zeros_like(sample.region)
        m = int(math.ceil(margin)) + 1
        ok[m:size - m, m:size - m] = sample.region[m:size - m, m:size - m]
    ys, xs = np.nonzero(ok)
    i = rng.integers(len(xs))
    return float(xs[i]) + rng.uniform(-0.5, 0.5), float(ys[i]) + rng.uniform(-0.5, 0.5)


def _blob(size: int, centre, radius: float, rng, aspect=(0.55, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Irregular filled blob: (mask, normalised radius in [0, 1) inside the blob)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rot = rng.uniform(0.0, math.pi)
    dx, dy = xx - centre[0], yy - centre[1]
    u = math.cos(rot) * dx + math.sin(rot) * dy
    v = (-math.sin(rot) * dx + math.cos(rot) * dy) / rng.uniform(*aspect)
    phi, r = np.arctan2(v, u), np.hypot(u, v)
    edge = np.ones_like(phi)
    for k in (2, 3, 5):
        edge += rng.uniform(0.0, 0.12) * np.cos(k * phi + rng.uniform(0.0, 2 * math.pi))
    rel = r / (radius * edge)
    return rel < 1.0, np.clip(rel, 0.0, 1.0)


def _scratch(sample, family, rng, size):
    length = rng.uniform(0.12, 0.25) * size
    p0 = np.array(_centre(sample, rng, 2.0))
    direction = rng.uniform(0.0, 2 * math.pi)
    p2 = p0 + length * np.array([math.cos(direction), math.sin(direction)])
    bend = rng.uniform(-0.2, 0.2) * length
    p1 = (p0 + p2) / 2 + bend * np.array([-math.sin(direction), math.cos(direction)])
    t = np.linspace(0.0, 1.0, 48)[:, None]
    curve = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2).astype(np.float32)
    width = max(1.5, size / 60.0)
    mask = _near_polyline(size, curve, width / 2)
    image = sample.image
    lum = float(image[mask].mean()) if mask.any() else 0.5
    target = 0.08 if lum > 0.5 else 0.95  # always contrasting with what it crosses
    return image * 0.3 + target * 0.7, mask


def _near_polyline(size: int, points: np.ndarray, radius: float) -> np.ndarray:
    lo = np.floor(points.min(0) - radius - 1).astype(int).clip(0, size)
    hi = np.ceil(points.max(0) + radius + 2).astype(int).clip(0, size)
    mask = np.zeros((size, size), bool)
    if (hi <= lo).any():
        return mask
    yy, xx = np.mgrid[lo[1]:hi[1], lo[0]:hi[0]].astype(np.float32)
    p = np.stack([xx.ravel(), yy.ravel()], 1)[:, None, :]  # [N, 1, 2]
    a, b = points[:-1][None], points[1:][None]  # [1, S, 2]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-9), 0.0, 1.0)
    dist = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(1)
    mask[lo[1]:hi[1], lo[0]:hi[0]] = (dist <= radius).reshape(xx.shape)
    return mask


def _hole(sample, family, rng, size):
    radius = max(2.2, rng.uniform(0.035, 0.06) * size)
    mask, rel = _blob(size, _centre(sample, rng, radius * 1.1), radius, rng, aspect=(0.7, 1.0))
    depth = (0.03 + 0.12 * rel ** 2)[..., None]  # dark pit, lighter towards its torn rim
    return np.broadcast_to(depth * np.array([1.0, 0.95, 0.9], np.float32), sample.image.shape), mask


STAIN_COLOURS = np.array([[0.30, 0.17, 0.07], [0.60, 0.28, 0.08], [0.28, 0.38, 0.12],
                          [0.12, 0.18, 0.50]], np.float32)


def _stain(sample, family, rng, size):
    radius = max(2.5, rng.uniform(0.04, 0.075) * size)
    mask, rel = _blob(size, _centre(sample, rng, radius * 0.9), radius, rng)
    colour = STAIN_COLOURS[rng.integers(len(STAIN_COLOURS))]
    alpha = (rng.uniform(0.5, 0.7) * (1.0 - 0.3 * rel ** 2))[..., None]  # no fade to zero: mask exact
    return sample.image * (1.0 - alpha) + colour * alpha, mask


def _cut_paste(sample, family, rng, size):
    """A patch cut elsewhere (another piece of texture, or another spot of the same image
    for objects), turned by 90/180/270 degrees and re-lit, pasted on."""
    h, w = (rng.uniform(0.07, 0.13, size=2) * size).astype(int).clip(4)
    if family.kind == "texture":
        source = family.render(rng, 0.0, (0.0, 0.0)).image
    else:
        source = sample.image
    k = int(rng.integers(1, 4))
    side = max(h, w)
    sy, sx = rng.integers(0, size - side, size=2)
    patch = np.rot90(source[sy:sy + side, sx:sx + side], k)[:h, :w]
    gain = 1.0 + rng.choice([-1.0, 1.0]) * rng.uniform(0.15, 0.3)
    cx, cy = _centre(sample, rng, min(h, w) / 2.0)
    y0 = int(np.clip(round(cy - h / 2), 0, size - h))
    x0 = int(np.clip(round(cx - w / 2), 0, size - w))
    image = sample.image.copy()
    image[y0:y0 + h, x0:x0 + w] = np.clip(patch * gain, 0.0, 1.0)
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + h, x0:x0 + w] = True
    return image, mask


_DEFECT_FUNCS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "cut_paste": _cut_paste}

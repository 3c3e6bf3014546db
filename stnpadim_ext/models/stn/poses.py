"""Good images in random poses: the STN's declared pose range put to other uses.

The ranges an STN is trained with (train_stn's rotation, translation and scale) declare
which poses it is meant to undo. Fitting and calibration draw poses from the same range
(PaDiM.fit / calibrate with pose_ranges): the "augmented" baseline fits plain PaDiM on
training images in random poses (what a user would try instead of an STN); behind an STN
the Gaussians and the threshold see what the STN makes of parts in such poses,
out-of-view corners included, instead of parts in the training pose only.

Posing an image by warping it resamples it, and aligning it resamples it again: twice the
interpolation blur that a real part, photographed in that pose and aligned once, shows.
PaDiM notices (measured on synth part_drift: good test parts scored 18-35 against 13-16
for such twice-resampled held-out parts, so the threshold rejected every good test part).
So `sample_posed` reads the aligned image from the original once, through both transforms.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
import torch.nn.functional as F

from ...data.images import as_float, iter_batches
from ...distributed import Shard, check_peers, owns_batch, share_of
from ...ops.affine_sample import affine_sample
from .transforms import random_similarity

RANGE_KEYS = ("rotation", "translation", "scale")


def random_views(n: int, ranges: dict, generator: torch.Generator, aspect: float = 1.0,
                 device=None) -> torch.Tensor:
    """n random proper similarity transforms [n, 2, 3] uniform in `ranges` ({"rotation":
    degrees, "translation": normalised, "scale": factor >= 1}, as train_stn's)."""
    return random_similarity(n, *(float(ranges[k]) for k in RANGE_KEYS), generator=generator,
                             aspect=aspect, device=device)


def sample_posed(x: torch.Tensor, view: torch.Tensor, forward: torch.Tensor,
                 padding_mode: str = "border") -> torch.Tensor:
    """warp(warp(x, view, border), forward, padding_mode), the alignment of x seen in pose
    `view`, sampled once from x: every output pixel q reads x at view(pad(forward(q))),
    where pad is the seen frame's padding (the seen image's edge for "border", its mirror
    for "reflection"; "zeros" leaves black where forward(q) leaves that frame).

    Args:
        x: images [B, C, H, W], float.
        view: [B, 2, 3], the pose x is seen in (seen = warp(x, view) with border padding).
        forward: [B, 2, 3], the alignment of the seen image (an STN's theta).
        padding_mode: the aligner's padding of the seen image.
    """
    b, _, h, w = x.shape
    # The seen image's own sampling positions, as a 2-channel image: resampling a linear
    # function is exact, and its padding is the seen image's padding.
    coords = F.affine_grid(view.to(x.dtype), [b, 2, h, w], align_corners=False).permute(0, 3, 1, 2)
    pad = "border" if padding_mode == "zeros" else padding_mode
    grid = affine_sample(coords, forward.to(x.dtype), padding_mode=pad).permute(0, 2, 3, 1)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if padding_mode == "zeros":
        out = out * affine_sample(x.new_ones(b, 1, h, w), forward.to(x.dtype), padding_mode="zeros")
    return out


def posed_batches(images, ranges: dict | None = None, seed: int = 0, batch_size: int = 32,
                  size: int | tuple[int, int] | None = None, n_views: int | None = None,
                  poses: dict | None = None, device=None, shard: Shard | None = None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
    """Batches (images, views, poses) of `images` seen in random poses within `ranges`,
    seeded, with their known true poses where given.

    Args:
        images: anything iter_batches accepts; a list of paths when `poses` is given. A
            list of paths is read batch by batch; other inputs are held in memory.
        ranges: pose ranges (see random_views); None: no views (each image as it is).
        seed: seeds the views and, with n_views, the order the images are cycled in.
        batch_size: images per batch.
        size: resize every image to this size first (None: keep).
        n_views: None: every image once, in input order. An int: that many views, cycling
            through the images, reshuffled each pass.
        poses: {path: theta [2, 3]} true poses of the images (the canonical frame into the
            image, as synth's meta.json records them), or None.
        device: where the batches are made and delivered.
        shard: (rank, world) of a torchrun group: yield only this rank's batches (every
            world-th from its rank; distributed.shards), each as one process would yield it,
            views included (the others' views are drawn and dropped, so the seeded
            sequence is the same). May yield nothing. None: every batch.

    Yields:
        (float images [b, 3, H, W] in [0, 1], views [b, 2, 3] or None, poses [b, 2, 3] or
        None), on `device`.
    """
    if ranges is None and poses is None and n_views is None:  # nothing to draw: stream
        may_be_empty = shard is not None
        if shard is not None and isinstance(images, (list, tuple, torch.Tensor)):
            images, shard = share_of(images, batch_size, shard), None  # the others' files stay unread
        for number, batch in enumerate(iter_batches(images, batch_size, size=size, device=device,
                                                    allow_empty=may_be_empty)):
            if shard is None or owns_batch(number, shard):
                check_peers()
                yield as_float(batch, device), None, None
        return
    paths = list(images) if isinstance(images, (list, tuple)) and all(
        isinstance(p, (str, os.PathLike)) for p in images) else None
    if paths is None:
        data = torch.cat([as_float(b) for b in iter_batches(images, batch_size, size=size)])
        count = data.shape[0]
    else:
        count = len(paths)
    known = None if poses is None else torch.tensor([poses[p] for p in paths], dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    if n_views is None:
        order = torch.arange(count)
    else:
        passes = -(-n_views // count)
        order = torch.cat([torch.randperm(count, generator=gen) for _ in range(passes)])[:n_views]
    for number, index in enumerate(order.split(batch_size)):
        if shard is not None and not owns_batch(number, shard):
            if ranges is not None:  # drawn all the same: the owner's views follow in sequence
                random_views(index.shape[0], ranges, gen)
            continue
        check_peers()
        if paths is None:
            x = as_float(data[index], device)
        else:
            x = as_float(next(iter_batches([paths[i] for i in index], index.shape[0], size=size)), device)
        views = None if ranges is None else random_views(index.shape[0], ranges, gen,
                                                         x.shape[-1] / x.shape[-2], device)
        yield x, views, None if known is None else known[index].to(device)

"""Which items a process of a torchrun group works on, and putting the pieces back in order.

A share is every world-th *batch* from the process's rank, not every world-th item: each
batch then holds exactly the images it holds in one process, so per-image results (the
backbone's features, scores, maps) are bit-identical to one process's, whatever the
number of processes. Only sums over images (the Gaussian statistics) change their
summation order. Pure functions: nothing here talks to other processes.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


class Shard(NamedTuple):
    """A process's place in its group: rank in 0..world-1, world >= 1."""

    rank: int
    world: int


WHOLE = Shard(0, 1)  # one process: the share is everything


def owns_batch(batch: int, shard: Shard) -> bool:
    """Whether the process `shard` works on batch number `batch` (0-based)."""
    return batch % shard.world == shard.rank


def share_indices(n: int, batch_size: int, shard: Shard) -> list[int]:
    """Indices (in 0..n-1, ascending) of the items in `shard`'s share of n items cut into
    batches of `batch_size`: batches b with b % world == rank.

    Split again into batches of `batch_size`, the share gives back exactly those batches
    (only the last batch of all may be short, and it is the last one of its share).
    """
    starts = range(shard.rank * batch_size, n, shard.world * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, n))]


def share_of(items, batch_size: int, shard: Shard):
    """`shard`'s share (share_indices) of a list, tuple or tensor, of the same kind."""
    index = share_indices(len(items), batch_size, shard)
    if isinstance(items, torch.Tensor):
        return items[torch.tensor(index, dtype=torch.long)]
    return type(items)(items[i] for i in index) if isinstance(items, tuple) else [items[i] for i in index]


def reassemble(parts: Sequence[Sequence], batch_size: int) -> list:
    """Inverse of share_of: parts[r] is rank r's share (of a world of len(parts)), in its
    order; returns all items in their original order."""
    world = len(parts)
    n = sum(len(part) for part in parts)
    out = [None] * n
    for rank, part in enumerate(parts):
        index = share_indices(n, batch_size, Shard(rank, world))
        if len(index) != len(part):
            raise ValueError(f"rank {rank} returned {len(part)} items for a share of {len(index)}")
        for i, item in zip(index, part, strict=True):
            out[i] = item
    return out


def reassemble_tensors(parts: Sequence[torch.Tensor], batch_size: int) -> torch.Tensor:
    """reassemble for tensors: parts[r] [n_r, ...] -> [sum n_r, ...] in original order."""
    world = len(parts)
    n = sum(part.shape[0] for part in parts)
    index = torch.tensor([i for rank in range(world) if parts[rank].shape[0] > 0
                          for i in share_indices(n, batch_size, Shard(rank, world))], dtype=torch.long)
    filled = [part for part in parts if part.shape[0] > 0]  # an empty share may lack the item shape
    if not filled:
        return parts[0]
    stacked = torch.cat(filled)
    out = torch.empty_like(stacked)
    out[index] = stacked
    return out

"""Intra-op thread counts for small-model work.

torch's default is one intra-op thread per core. For a tiny network (the STN: a few
thousand parameters on 64 px inputs) each op is too short to split: every op pays a
fork/join across all threads, and when another process holds one of the cores, every op
waits for the descheduled thread at each barrier. README's Performance section has the
measurement behind SMALL_WORK_THREADS.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

SMALL_WORK_THREADS = 1


@contextlib.contextmanager
def limit_threads(n: int | None = None) -> Iterator[None]:
    """Runs the block (or, as a decorator, the function) with at most n intra-op threads
    (default SMALL_WORK_THREADS, read at each call); the previous count is restored
    afterwards, also on error.

    Example:
        >>> with limit_threads(1):
        ...     train_small_model()
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(SMALL_WORK_THREADS if n is None else n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)

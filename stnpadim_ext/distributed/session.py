"""One rank of a torchrun group: its process group, device, threads and watch.

torchrun (torch.distributed.run) starts the processes and tells each where it stands in
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RUN_ID); `start` reads them, so the same variables set by hand
(or by another launcher) work too.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from ..data import images
from ..errors import InputError
from . import collect
from .watch import Watch

# Seconds a collective may wait for the slowest rank before the group gives up: the shares
# are balanced to a batch, so the waits are short; a rank that hangs must not hang the
# others forever. Dead ranks are found sooner, by their broken connections.
TIMEOUT_VARIABLE = "STNPADIM_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class Rank:
    """Where this process stands in its torchrun group, and what it runs on.

    Attributes:
        rank, world: global rank and group size.
        local_rank, local_world: rank and process count on this host.
        device: the torch device this rank computes on.
        threads: intra-op threads (CPU ranks: their share of the host's cores).
        watch: heartbeats and posted failure of the group.
    """

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    threads: int
    watch: Watch


def launched() -> bool:
    """Whether this process was started as one of several ranks (RANK set, WORLD_SIZE > 1;
    a WORLD_SIZE that is no integer counts, and is reported when the session starts)."""
    size = os.environ.get("WORLD_SIZE", "1").strip()
    return "RANK" in os.environ and size not in ("", "0", "1")


def env_rank() -> int:
    """RANK from the environment (0 when unset or not an integer)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    """The device of the rank with this LOCAL_RANK: cuda:LOCAL_RANK where GPUs exist (or
    for --device cuda), else the CPU; an explicit --device cuda:N or cpu is kept.

    Raises:
        InputError when this host has fewer GPUs than CUDA ranks (NCCL needs one GPU per rank).
    """
    wanted = torch.device(requested) if requested else None
    if wanted is not None and (wanted.type == "cpu" or wanted.index is not None):
        return wanted
    if wanted is None and not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise InputError(f"LOCAL_RANK {local_rank}: this host has {count} CUDA device(s); start at "
                         f"most {count} processes per node (--nproc-per-node), or pass --device cpu")
    return torch.device("cuda", local_rank)


def cpu_share(local_world: int) -> int:
    """Intra-op threads of one of `local_world` CPU ranks of a host: the cores this process
    may run on (its affinity; taskset narrows it), split evenly, at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world)


def timeout() -> timedelta:
    """The collective timeout: STNPADIM_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    text = os.environ.get(TIMEOUT_VARIABLE, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InputError(f"{TIMEOUT_VARIABLE}={text}: must be a number of seconds > 0")
    return timedelta(seconds=seconds)


@contextlib.contextmanager
def start(requested_device: str | None = None) -> Iterator[Rank]:
    """Joins the torchrun group for the block: process group (gloo for CPU ranks; NCCL for
    CUDA tensors beside gloo for objects), device, threads, watch; left on exit.

    Args:
        requested_device: the command's --device (None: cuda:LOCAL_RANK where GPUs exist).

    Raises:
        InputError: a bad environment (no MASTER_ADDR, ...), an unreachable rendezvous, too
            few GPUs for the CUDA ranks of this host.
    """
    rank, world = _int_env("RANK", 0), _int_env("WORLD_SIZE", 1)
    local_rank, local_world = _int_env("LOCAL_RANK", 0), _int_env("LOCAL_WORLD_SIZE", 1)
    device, limit = pick_device(requested_device, local_rank), timeout()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL: its communicator binds to this GPU
    try:
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                rank=rank, world_size=world, timeout=limit)
    except (dist.DistError, ValueError) as exc:  # no MASTER_ADDR, rendezvous timed out, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"rank {rank}: cannot join the torchrun group ({first})") from None
    previous_threads, previous_decoders = torch.get_num_threads(), images.DECODE_WORKERS
    watch = None
    try:
        threads = previous_threads
        if device.type == "cpu":
            # No oversubscription: the host's cores split between its ranks (torchrun's own
            # default, OMP_NUM_THREADS=1, would leave the rest idle).
            threads = cpu_share(local_world)
            torch.set_num_threads(threads)
        images.DECODE_WORKERS = cpu_share(local_world)  # decoding threads too
        group = dist.new_group(backend="gloo", timeout=limit) if device.type == "cuda" else None
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        watch = Watch(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world,
                      f"stnpadim/{run}/{restart}")
        collect.configure(group, watch)
        yield Rank(rank, world, local_rank, local_world, device, threads, watch)
    finally:
        collect.configure()
        if watch is not None:
            watch.close()
        images.DECODE_WORKERS = previous_decoders
        torch.set_num_threads(previous_threads)
        dist.destroy_process_group()


def _int_env(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(f"environment variable {name}={text!r} must be an integer") from None

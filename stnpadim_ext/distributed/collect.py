"""Collectives on CPU data (scores, rows, maps, small objects) between the processes of a
torchrun group, and the questions every caller asks: am I one of several, which share is
mine, am I rank 0.

Every function also works in one process without a process group (it does nothing, or
returns its argument), so callers keep one code path. Objects travel on a gloo group: the
default group when the ranks run on CPUs, a side group when NCCL serves CUDA tensors.
"""
from __future__ import annotations

import pickle

import torch
import torch.distributed as dist

from ..errors import InputError
from .shards import WHOLE, Shard, reassemble, reassemble_tensors

# Set by the session: the group objects travel on (None: the default group), and the
# watch whose flag says another rank has posted a failure.
_state = {"group": None, "watch": None}


class ReportedElsewhere(InputError):
    """Bad input that another rank reports: this rank exits 2 without a message."""


class PeerStopped(RuntimeError):
    """Another rank posted a failure: this rank stops at its next batch."""


def active() -> bool:
    """Whether this process is one of several in an initialised torch.distributed group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shard() -> Shard:
    """This process's (rank, world); WHOLE without a group."""
    return Shard(dist.get_rank(), dist.get_world_size()) if active() else WHOLE


def is_main() -> bool:
    """Rank 0 of the group, or the only process: the one that writes shared outputs."""
    return shard().rank == 0


def configure(group=None, watch=None) -> None:
    """Sets the object group and the watch (the session's doing; None, None resets)."""
    _state.update(group=group, watch=watch)


def check_peers() -> None:
    """Raises PeerStopped when another rank has posted a failure (read from the watch's
    flag, no communication): long loops call it once a batch so that the run stops
    everywhere within a batch, not at the next collective."""
    watch = _state["watch"]
    if watch is not None and watch.peer_failed:
        raise PeerStopped("another rank failed")


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_state["group"])
    return out


def gather_objects_to_main(obj) -> list | None:
    """Every rank's `obj` in rank order on rank 0; None elsewhere."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_state["group"])
    return out


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_state["group"])
    return box[0]


def barrier() -> None:
    """Waits until every rank gets here."""
    if active():
        dist.barrier(group=_state["group"])


def gather_in_order(items: list, batch_size: int, main_only: bool = False) -> list | None:
    """All ranks' shares (share_of with this batch_size) put back in input order: on
    every rank, or with main_only on rank 0 alone (None elsewhere)."""
    parts = gather_objects_to_main(items) if main_only else all_gather_objects(items)
    return None if parts is None else reassemble(parts, batch_size)


def gather_tensor_in_order(local: torch.Tensor, batch_size: int, main_only: bool = False
                           ) -> torch.Tensor | None:
    """gather_in_order for a CPU tensor [n_rank, ...] -> [n, ...] in input order."""
    parts = gather_objects_to_main(local) if main_only else all_gather_objects(local)
    return None if parts is None else reassemble_tensors(parts, batch_size)


def all_reduce_float(value: float, op: str) -> float:
    """`value` reduced over the ranks: op "min", "max" or "sum"."""
    if not active():
        return value
    ops = {"min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}
    box = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(box, op=ops[op], group=_state["group"])
    return float(box.item())


def on_main(fn, *args, **kwargs):
    """Runs fn on rank 0 alone and returns its result on every rank: a check that must
    happen once (the output rules) before any rank starts working. An InputError there is
    raised on rank 0 and stops the others quietly (ReportedElsewhere)."""
    if not active():
        return fn(*args, **kwargs)
    outcome, error = None, None
    if is_main():
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except InputError as exc:
            error, outcome = exc, ("error", str(exc))
    outcome = broadcast_from_main(outcome)
    if outcome[0] == "error":
        if error is not None:
            raise error
        raise ReportedElsewhere(outcome[1])
    return outcome[1]


def same_on_every_rank(obj) -> bool:
    """Whether `obj` pickles to the same bytes on every rank (a cheap consistency check)."""
    data = pickle.dumps(obj)
    return len(set(all_gather_objects(data))) == 1

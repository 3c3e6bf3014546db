"""Running fit, score and eval as a torchrun group: shares, collectives, sessions, faults.

    shards   which items a rank works on (every world-th batch) and putting results back
             in input order; pure functions
    collect  collectives on CPU data (gathers in input order, broadcast from rank 0, the
             once-only checks); each is a no-op in one process
    session  one rank's process group, device and threads, from torchrun's environment
    watch    heartbeats and the first posted failure, in the rendezvous store

Layering: this package uses torch.distributed, data and errors, and nothing above them;
models call collect (PaDiM.fit / calibrate with shard=True), the CLI starts the session.
"""
from .collect import (
    PeerStopped,
    ReportedElsewhere,
    active,
    all_gather_objects,
    all_reduce_float,
    barrier,
    broadcast_from_main,
    check_peers,
    gather_in_order,
    gather_objects_to_main,
    gather_tensor_in_order,
    is_main,
    on_main,
    shard,
)
from .shards import WHOLE, Shard, owns_batch, reassemble, share_indices, share_of

__all__ = ["PeerStopped", "ReportedElsewhere", "Shard", "WHOLE", "active", "all_gather_objects",
           "all_reduce_float", "barrier", "broadcast_from_main", "check_peers", "gather_in_order",
           "gather_objects_to_main", "gather_tensor_in_order", "is_main", "on_main", "owns_batch",
           "reassemble", "share_indices", "share_of", "shard"]

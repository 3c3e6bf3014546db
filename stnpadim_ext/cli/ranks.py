"""Running a command in one process, or as one rank of a torchrun group.

    torchrun --nproc-per-node N [--nnodes M ...] -m stnpadim_ext fit|score|eval ...

Under torchrun every rank runs the same command with the same options on its share of the
files (distributed.shards); rank 0 alone prints and writes the shared outputs. How a run
ends, on every rank:

- success: every rank waits for rank 0 to finish writing, then exits 0;
- bad input (an InputError or OSError) found by any rank: the first rank to find it
  prints it, every rank exits 2;
- a rank that dies (killed, crashed, host gone): the others stop at their next collective
  or batch, print one line naming it and exit 1 (a rank that hangs: after the collective
  timeout, STNPADIM_DIST_TIMEOUT seconds);
- Ctrl-C / SIGTERM with no rank at fault: as in one process (130 / 143).

A rank leaves with os._exit once its outcome is decided and its session closed: torchrun
sends SIGTERM to the other ranks as soon as one exits, and a rank still tearing down the
interpreter would die of it (-15) instead of exiting with its own status.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

import torch.distributed as dist

from ..distributed import PeerStopped, ReportedElsewhere, barrier, session
from ..distributed.watch import StoreLost
from ..errors import InputError

DISTRIBUTED_COMMANDS = ("fit", "score", "eval")
PEER_FAILURE = 1  # exit status of a rank stopped by another rank's failure


def run_command(args) -> int:
    """Runs args.run(args) in this process and returns its exit status; under torchrun,
    runs it as this process's rank and exits the process (see the module docstring)."""
    if not session.launched():
        return args.run(args) or 0
    if args.command not in DISTRIBUTED_COMMANDS:
        fail_together(f"`stnpadim {args.command}` runs in one process; under torchrun: "
                      f"{', '.join(DISTRIBUTED_COMMANDS)}")
    _leave(*_run_rank(args))


def fail_together(message: str) -> None:
    """Under torchrun (else returns): an error every rank finds alike before any work (bad
    arguments, a command that runs in one process). Rank 0 prints it; every rank exits 2
    once all have got this far, since torchrun stops the others (SIGTERM) as soon as one
    exits, and a rank still starting up would die of it."""
    if not session.launched():
        return
    line = message if session.env_rank() == 0 else None
    _decided(2, line)
    try:
        with session.start("cpu"):
            barrier()
    except Exception:  # a group that cannot meet: leave all the same
        pass
    _leave(2, line)


def _run_rank(args) -> tuple[int, str | None]:
    """(exit status, line to print or None) of this rank's run."""
    try:
        with session.start(getattr(args, "device", None)) as rank:
            return _decided(*_run_in_session(args, rank))
    except InputError as exc:  # the session could not start: each rank says why
        return _decided(2, str(exc))


def _run_in_session(args, rank: session.Rank) -> tuple[int, str | None]:
    args.device = str(rank.device)
    args.progress = args.progress and rank.rank == 0
    try:
        with _quiet_unless_rank0(rank.rank):
            code = args.run(args) or 0
            barrier()  # nobody leaves before rank 0 has written the outputs
        return code, None
    except BaseException as exc:
        # torchrun's SIGTERM (sent as soon as another rank exits) must not cut this short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return _failure(rank, exc)


def _failure(rank: session.Rank, exc: BaseException) -> tuple[int, str | None]:
    """The outcome of a run that raised `exc`."""
    if isinstance(exc, ReportedElsewhere):
        return 2, None
    if isinstance(exc, (InputError, OSError)):
        line = str(exc) if isinstance(exc, InputError) else _os_error(exc)
        return 2, line if rank.watch.post("input", line) else None  # the first rank to find it says it
    if isinstance(exc, (PeerStopped, KeyboardInterrupt, RuntimeError)):  # gloo's broken pipes: RuntimeErrors
        outcome = _peer_failure(rank, exc)
        if outcome is not None:
            return outcome
        if not isinstance(exc, RuntimeError) or _collective_error(exc):
            return _unexplained(rank, exc)
    if not isinstance(exc, Exception):  # SystemExit and the like
        raise exc
    return _crash(rank, exc)


class _quiet_unless_rank0:
    """Other ranks print nothing on stdout and show no warning (stderr stays for errors)."""

    def __init__(self, rank: int):
        self.rank = rank

    def __enter__(self):
        if self.rank != 0:
            self._stdout, self._warnings = sys.stdout, warnings.catch_warnings()
            self._warnings.__enter__()
            warnings.simplefilter("ignore")
            sys.stdout = open(os.devnull, "w")

    def __exit__(self, *exc):
        if self.rank != 0:
            sys.stdout.close()
            sys.stdout = self._stdout
            self._warnings.__exit__(*exc)


def _peer_failure(rank: session.Rank, exc: BaseException) -> tuple[int, str | None] | None:
    """The outcome when another rank explains why a collective failed or this rank was
    stopped: its posted failure, or its stopped heartbeat; None when none does."""
    try:
        posted = rank.watch.posted()
        if posted is not None and posted["rank"] != rank.rank:
            if posted["kind"] == "input":
                return 2, None  # the posting rank said it
            return PEER_FAILURE, f"rank {posted['rank']} failed ({posted['message']}); rank {rank.rank} stops too"
        stopped = rank.watch.stopped()
        if stopped:
            names = ", ".join(f"rank {r}" + (f" ({who})" if (who := rank.watch.who(r)) else "") for r in stopped)
            return PEER_FAILURE, (f"{names} of {rank.world} stopped (killed, crashed or unreachable); "
                                  f"rank {rank.rank} stops too")
    except StoreLost as lost:
        return PEER_FAILURE, f"{lost}: rank 0 or node 0's torchrun stopped; rank {rank.rank} stops too"
    return None


def _collective_error(exc: RuntimeError) -> bool:
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text


def _unexplained(rank: session.Rank, exc: BaseException) -> tuple[int, str | None]:
    """A plain Ctrl-C / SIGTERM, or a collective that failed with every rank alive (a hang
    past the timeout)."""
    if isinstance(exc, KeyboardInterrupt):
        from . import Terminated

        terminated = isinstance(exc, Terminated)
        print(f"stnpadim: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return (143 if terminated else 130), None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return PEER_FAILURE, (f"rank {rank.rank}: a collective operation failed ({first}); no rank was seen "
                          f"to stop: one may hang (collective timeout: {session.TIMEOUT_VARIABLE})")


def _crash(rank: session.Rank, exc: BaseException) -> tuple[int, str | None]:
    """A bug: its traceback on this rank, one line on the others."""
    rank.watch.post("crash", f"{type(exc).__name__}: {exc}")
    traceback.print_exc()
    return 1, None


def _decided(code: int, line: str | None) -> tuple[int, str | None]:
    # From here on a SIGTERM (torchrun stopping the group) ends this rank with its own status.
    signal.signal(signal.SIGTERM, lambda *_: _leave(code, line))
    return code, line


def _os_error(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or exc}"


def _leave(code: int, line: str | None = None):
    if line is not None:
        print(f"stnpadim: error: {' '.join(line.split())}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

"""Heartbeats and the first failure of a torchrun group, kept in its rendezvous store.

When a process of the group dies, the others learn it as a broken connection in their
next collective, a message that names no rank; when one finds bad input, every other one
would report it again. So every rank keeps, in the store torchrun already runs:

- a heartbeat: a daemon thread adds 1 to the rank's counter every BEAT_SECONDS. A rank
  whose counter stops moving has stopped: killed, crashed hard, frozen, or its host gone.
- the first failure: a failing rank posts it with compare-and-set, so exactly one rank
  wins and only the winner prints it; the heartbeat thread of every other rank sees the
  post and raises a flag that their batch loops check (collect.check_peers).
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import timedelta

import torch.distributed as dist

BEAT_SECONDS = 0.5
# A counter that has not moved for this long belongs to a stopped rank: 8 missed beats,
# slack for a rank whose heartbeat thread waits for the GIL on a busy machine.
STALL_SECONDS = 4.0
STORE_TIMEOUT = timedelta(seconds=10)


class StoreLost(RuntimeError):
    """The rendezvous store cannot be reached (it lives with rank 0 or node 0's torchrun)."""


class Watch:
    """One rank's view of the group's heartbeats and posted failure.

    Args:
        host, port: the rendezvous store (MASTER_ADDR, MASTER_PORT).
        rank, world: this process's rank and the group size.
        prefix: key prefix, unique to the run (and to the restart under torchrun).
    """

    def __init__(self, host: str, port: int, rank: int, world: int, prefix: str):
        self.address, self.rank, self.world, self.prefix = f"{host}:{port}", rank, world, prefix
        self._host, self._port = host, port
        self.store = self._connect()  # the main thread's client; the beat thread has its own
        self.store.set(self._key("who", rank), f"pid {os.getpid()} on {socket.gethostname()}")
        self.peer_failed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="stnpadim-heartbeat", daemon=True)
        self._thread.start()

    def _connect(self):
        return dist.TCPStore(self._host, self._port, is_master=False, timeout=STORE_TIMEOUT,
                             wait_for_workers=False)

    def _key(self, *parts) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _beat(self) -> None:
        try:
            store = self._connect()
            beat, posted = self._key("beat", self.rank), self._key("failure")
            while not self._stop.is_set():
                store.add(beat, 1)
                if not self.peer_failed and store.check([posted]):
                    self.peer_failed = json.loads(store.get(posted))["rank"] != self.rank
                self._stop.wait(BEAT_SECONDS)
        except Exception:  # the store is gone: the main thread learns it at its next collective
            return

    def close(self) -> None:
        """Stops the heartbeat and says goodbye: a rank that leaves on purpose is not one
        that stopped."""
        try:
            self.store.set(self._key("left", self.rank), "1")
        except (RuntimeError, OSError):
            pass  # the store is gone: nobody is left to ask
        self._stop.set()
        self._thread.join(timeout=2 * BEAT_SECONDS + STORE_TIMEOUT.total_seconds())

    def post(self, kind: str, message: str) -> bool:
        """Posts this rank's failure unless another rank posted first; True when this
        rank's post is the one (its message is the one to print).

        Args:
            kind: "input" (bad input: exit 2 everywhere, printed once) or "crash".
            message: one line.
        """
        value = json.dumps({"rank": self.rank, "kind": kind, "message": message})
        try:
            return self._store_call(self.store.compare_set, self._key("failure"), "", value) == value.encode()
        except StoreLost:
            return True  # nobody else can learn of it: say it here

    def posted(self) -> dict | None:
        """The posted failure {"rank", "kind", "message"}, or None."""
        key = self._key("failure")
        if not self._store_call(self.store.check, [key]):
            return None
        return json.loads(self._store_call(self.store.get, key))

    def who(self, rank: int) -> str:
        """"pid P on HOST" of a rank, as it registered ("" if it never did)."""
        key = self._key("who", rank)
        return self._store_call(self.store.get, key).decode() if self._store_call(self.store.check, [key]) else ""

    def stopped(self, wait: float = STALL_SECONDS) -> list[int]:
        """Ranks (other than this one) whose heartbeat did not move for `wait` seconds and
        that did not leave on purpose (close)."""
        def counts():
            return [self._store_call(self.store.add, self._key("beat", r), 0) for r in range(self.world)]

        before = counts()
        time.sleep(wait)
        after = counts()
        return [r for r in range(self.world) if r != self.rank and after[r] == before[r]
                and not self._store_call(self.store.check, [self._key("left", r)])]

    def _store_call(self, method, *args):
        try:
            return method(*args)
        except (RuntimeError, OSError) as exc:  # DistStoreError / DistNetworkError are RuntimeErrors
            raise StoreLost(f"the rendezvous store at {self.address} is unreachable ({exc})") from None

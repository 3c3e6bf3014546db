"""A torchrun worker script for tests/test_torchrun.py: runs `stnpadim ARGS` as a rank.

The rank named in STNPADIM_TEST_KILL_RANK kills itself (SIGKILL: no clean-up, no message)
when it starts its second batch of predictions, as a rank whose process dies mid-run; the
rank named in STNPADIM_TEST_HANG_RANK stops there instead, alive (heartbeat still beating),
as a rank stuck in a driver call or on a dead file system mount.
"""
import os
import signal
import sys
import time

from stnpadim_ext.cli import main
from stnpadim_ext.models.padim.model import PaDiM

KILL = os.environ.get("RANK") == os.environ.get("STNPADIM_TEST_KILL_RANK")
HANG = os.environ.get("RANK") == os.environ.get("STNPADIM_TEST_HANG_RANK")

if KILL or HANG:
    predict_batch, calls = PaDiM.predict_batch, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            if KILL:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(600)  # ended by torchrun once the others have given up
        return predict_batch(self, *args, **kwargs)

    PaDiM.predict_batch = failing

sys.exit(main(sys.argv[1:]))

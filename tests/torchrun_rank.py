"""A torchrun worker script for tests/test_torchrun.py: runs `stnpadim ARGS` as a rank, and
the rank named in STNPADIM_TEST_KILL_RANK kills itself (SIGKILL: no clean-up, no message)
when it starts its second batch of predictions, as a rank whose process dies mid-run."""
import os
import signal
import sys

from stnpadim_ext.cli import main
from stnpadim_ext.models.padim.model import PaDiM

if os.environ.get("RANK") == os.environ.get("STNPADIM_TEST_KILL_RANK"):
    predict_batch, calls = PaDiM.predict_batch, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return predict_batch(self, *args, **kwargs)

    PaDiM.predict_batch = dying

sys.exit(main(sys.argv[1:]))

"""A `stnpadim serve` process for tests and benchmarks, and the fault-injecting entry point.

`ServeProcess` starts the server on 127.0.0.1 and a free port (read from its start line)
and collects its log. Run as a script, this file is `stnpadim` with faults injected into
the model call (tests/test_serve.py only):

    python tests/serve_harness.py serve --model M ...

    STNPADIM_TEST_POISON=V   a batch holding an image whose pixels all equal V raises
                             (as a model bug or a device error would)
    STNPADIM_TEST_DELAY=S    every model call sleeps S seconds first (a slow model, so that
                             tests can act while a batch runs or the queue is full)
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

START_TIMEOUT = 180  # torch import and model load on a busy 2-core machine


class ServeProcess:
    """`stnpadim serve --model MODEL --port 0 OPTIONS...` in a child process.

    Args:
        model: model file.
        *options: more `serve` options.
        env: extra environment variables.
        faults: run this file (faults per env) instead of `python -m stnpadim_ext`.
    """

    def __init__(self, model: Path, *options: str, env: dict | None = None, faults: bool = False):
        import httpx  # the serve extra; imported here so that the module imports without it

        self._httpx = httpx
        entry = [str(Path(__file__).resolve())] if faults else ["-m", "stnpadim_ext"]
        self.process = subprocess.Popen(
            [sys.executable, *entry, "serve", "--model", str(model), "--port", "0", *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._collect, daemon=True).start()
        if not self._ready.wait(START_TIMEOUT) or self.process.poll() is not None:
            self.kill()
            raise AssertionError("serve did not start:\n" + self.log)
        self.url = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log).group(1)

    def _collect(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self._ready.set()
        self._ready.set()  # exited before starting

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int:
        """Sends `sig` (if still running) and returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)

    def metrics(self) -> dict[str, float]:
        """GET /metrics as {series: value} (series with labels as printed)."""
        text = self._httpx.get(self.url + "/metrics", timeout=30).text
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}

    def rss_mb(self) -> float:
        """Resident memory of the server process, MiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def _inject_faults() -> None:
    from stnpadim_ext.models.padim.model import PaDiM

    poison = os.environ.get("STNPADIM_TEST_POISON")
    delay = float(os.environ.get("STNPADIM_TEST_DELAY", "0"))
    predict_batch = PaDiM.predict_batch

    def faulty_predict_batch(self, x, output_size=None):
        time.sleep(delay)
        if poison is not None and bool((x == int(poison)).flatten(1).all(1).any()):
            raise RuntimeError("injected fault: a poisoned image in this batch")
        return predict_batch(self, x, output_size)

    PaDiM.predict_batch = faulty_predict_batch


if __name__ == "__main__":
    _inject_faults()
    from stnpadim_ext.cli import main

    sys.exit(main(sys.argv[1:]))

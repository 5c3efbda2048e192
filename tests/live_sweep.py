"""hstu-exp as a live process, for the resume and interruption tests: read its console line by
line and send it a signal at a chosen moment.

    sweep = LiveSweep("-m", *GRID, f"hydra.sweep.dir={out}")
    sweep.wait_for(r": running$", count=3)   # the third point is being timed
    sweep.signal(signal.SIGTERM)
    rc = sweep.finish()
"""

import os
import re
import signal
import subprocess
import sys
import threading
import time

from helpers import ROOT

# A sweep (with -m) of six points of the tiny model; each times for at least min_time_s, which
# leaves a window to signal a sweep while a given point runs.
GRID = [
    "model=tiny",
    "cache=paged",
    "logger=none",
    "workload.batch_size=1,2",
    "workload.total_history=32,64,128",
    "workload.new_history=32",
    "workload.warmup=1",
    "workload.iters=3",
    "workload.min_time_s=0.5",
]
POINTS = 6


def _default_sigint():
    # A runner that started us in the background may ignore SIGINT, and the child would inherit
    # that: give it the default, as a terminal's Ctrl-C finds it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class LiveSweep:
    def __init__(self, *args, timeout: float = 240, env=None, new_session: bool = False):
        """new_session: a process group of its own, so `signal_group` can stand in for a
        terminal's Ctrl-C (which reaches every process of the group)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hstu_exp", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            preexec_fn=_default_sigint,
            start_new_session=new_session,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.deadline = time.monotonic() + timeout

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, count: int = 1) -> None:
        """Until `count` console lines match `pattern` (fails when the sweep ends first)."""
        rx = re.compile(pattern)
        while sum(bool(rx.search(line)) for line in list(self.lines)) < count:
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"sweep ended before {count} x {pattern!r}:\n{self.output}")
            if time.monotonic() > self.deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.output}")
            time.sleep(0.02)

    def signal(self, signum) -> None:
        self.proc.send_signal(signum)

    def signal_group(self, signum) -> None:
        os.killpg(self.proc.pid, signum)

    def finish(self) -> int:
        rc = self.proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        self._reader.join(timeout=10)
        return rc

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

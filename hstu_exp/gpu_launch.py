"""hydra/launcher=gpus: a sweep that fills the host's GPUs, one point per GPU at a time.

Hydra's joblib launcher runs the points; this module adds the GPUs. The launching process
chooses the GPUs, starts one loky worker per GPU (joblib's n_jobs) and hands each point to
`run_point_on_gpu`, which holds one GPU for the worker's life (hstu_exp.gpus.GpuLeases) and
runs the point there. Records, resume and the close-out are the ones of the basic launcher: the
points write their records into the sweep dir, the close-out reads them. A Ctrl-C or SIGTERM
to the launching process goes on to the workers through the leases: each marks its point
interrupted, no further point starts, and the launching process closes out as after any stop.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from hstu_exp.gpus import ENV, GpuLeases, choose_gpus, visible_gpus
from hstu_exp.runner import STOP

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Worker:
    """This worker process on its GPU. One per process and lease folder (_WORKERS): a loky
    worker runs many points, but CUDA binds a process to its devices only once."""

    def __init__(self, leases: GpuLeases):
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            raise RuntimeError("CUDA started in this worker before it took a GPU")
        self.index, self.device, self._fd = leases.claim()  # the fd holds the lock: keep it
        os.environ[ENV] = self.device
        self.running = self.interrupted = False
        for signum in _SIGNALS:
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum, frame):
        # The first signal in a point interrupts it (runner.run_point writes its `interrupted`
        # record); a Ctrl-C reaches a worker twice (the terminal's, then the launcher's), and
        # the second must not cut that record short.
        STOP.append(signum)
        if self.running and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt


_WORKERS: dict = {}  # lease folder -> _Worker of this process


def run_point_on_gpu(task_function, leases: GpuLeases, cfg) -> dict:
    """One point in a worker. What became of it, for `launch` in the launching process:
    status (None: not run), and the signal or the cause that stopped the sweep, if one did."""
    worker = _WORKERS.get(leases.folder)
    if worker is None:
        worker = _WORKERS[leases.folder] = _Worker(leases)
    if STOP:  # a signal came between points: the sweep stops here too
        leases.stop()
        return {"status": None, "signal": STOP[0]}
    if leases.stopped():  # another worker or the launching process stopped the sweep
        return {"status": None}
    worker.running, worker.interrupted = True, False
    try:
        status = task_function(cfg)
    except KeyboardInterrupt:  # its record says `interrupted`
        leases.stop()
        return {"status": "failed", "signal": STOP[0] if STOP else signal.SIGINT}
    except BaseException as exc:  # noqa: BLE001 - the point ended the sweep (a record unwritable)
        leases.stop()
        return {"status": None, "stop": str(exc) or type(exc).__name__}
    finally:
        worker.running = False
    return {"status": status}


def launch(launcher, job_overrides, initial_job_idx: int):
    """The joblib launcher's launch with one worker per chosen GPU (runs in the launching
    process). The points' outcomes go to hstu_exp.cli, which gives the exit status."""
    from hydra_plugins.hydra_joblib_launcher import _core
    from joblib.externals.loky import get_reusable_executor

    from hstu_exp import cli

    cfg = launcher.config
    sweep_dir = Path(str(cfg.hydra.sweep.dir))
    devices = choose_gpus(visible_gpus(), launcher.gpus)
    leases = GpuLeases(devices, sweep_dir / ".gpus")
    leases.reset()
    logger = OmegaConf.to_container(cfg.logger, resolve=True) if "logger" in cfg else None
    cli.sweep_in_workers(sweep_dir, logger)

    def forward(signum, frame):
        if STOP:  # a second signal: stop waiting (joblib ends the workers)
            raise KeyboardInterrupt
        STOP.append(signum)
        leases.stop()  # before signalling: a worker that misses the signal sees the stop file
        for pid in leases.holders().values():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    task_function = launcher.task_function
    launcher.task_function = functools.partial(run_point_on_gpu, task_function, leases)
    launcher.joblib.update(n_jobs=len(devices), batch_size=1)  # a point at a time per worker
    previous = {signum: signal.signal(signum, forward) for signum in _SIGNALS}
    try:
        runs = _core.launch(
            launcher=launcher, job_overrides=job_overrides, initial_job_idx=initial_job_idx
        )
    except BrokenProcessPool as exc:  # a worker died (a crash, the OOM killer, C++ terminate):
        # joblib has ended the others; their points in progress have no record
        if STOP:
            raise KeyboardInterrupt from None
        codes = [line for line in str(exc).splitlines() if "exit codes" in line]
        cli.points_ran_in_workers(
            [
                {
                    "stop": "a worker process ended abruptly ("
                    + (codes[0].strip() if codes else type(exc).__name__)
                    + "); the points it and the others were running have no "
                    "record"
                }
            ]
        )
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        launcher.task_function = task_function
        # joblib keeps its workers for a later Parallel call; this sweep has none, and an exit
        # after a stop (cli._exit_after_interrupt) would wait for them forever
        get_reusable_executor(reuse=True).shutdown(wait=True)
    cli.points_ran_in_workers([r.return_value for r in runs if r.status == JobStatus.COMPLETED])
    return runs

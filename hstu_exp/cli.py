"""`hstu-exp`: a Hydra app with a preflight.

Before Hydra starts, every value of every swept key is composed and validated once, so bad input
stops with one line naming the key and value (exit 2) before anything is written. A single run
also checks the combination of keys; in a sweep an impossible combination becomes a `skipped`
record instead. Exit status 1 when any point failed.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import time
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf

from hstu_exp.config import (ConfigError, device_problem, point_problem, register_configs,
                             validate)
from hstu_exp.runner import STOP as _stop  # signals received, for the exit code

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
register_configs()

_failed = []  # statuses of this process's points, for the exit code
_sweep = {}  # sweep dir and logger of the points run in this process, for a close-out on Ctrl-C


def _on_signal(signum, frame):
    # Ctrl-C and SIGTERM take one path: the point in progress is marked. The exit status comes
    # from _stop, not from where the KeyboardInterrupt surfaced (library code may turn it into
    # another exception and exit on its own).
    _stop.append(signum)
    raise KeyboardInterrupt


# Flags that hand control to Hydra's own reporting (help, printing config, ...).
_PASS_THROUGH = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "--shell-completion",
                 "-sc", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                 "--experimental-rerun", "-p", "--package", "--resolve", "--version"}


def _one_line(exc: BaseException) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        shown = [o for o in exc.options or [] if not o.endswith("_schema")]
        options = f" (available: {', '.join(shown)})" if shown else ""
        return f"{group}={option}: no such option{options}"
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or str(cause)
    msg = msg.strip().splitlines()[0] if msg.strip() else type(cause).__name__
    if key and ("not in struct" in msg or msg.startswith(f"Key '{key.split('.')[-1]}' not in")):
        msg = "unknown key"
    if not key and cause is not exc:
        first = str(exc).strip().splitlines()[0]
        return f"{first} {msg}"
    return f"{key}: {msg}" if key else msg


def _expand(overrides):
    """[(key, [override strings])] for each override; a sweep gives one string per value."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    out = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            out.append((key, [f"{key}={v}" for v in o.sweep_string_iterator()]))
        else:
            out.append((key, [o.input_line]))
    return out


def _device_problem(cfg):
    from hstu_exp.env import resolve_device

    return device_problem(cfg) if resolve_device(cfg.device).type != "cuda" else None


def preflight(args) -> int:
    """Validate; return the number of points (1 for a single run)."""
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-")]
    expanded = [(k, v) for k, v in _expand(overrides) if not k.lstrip("+~").startswith("hydra.")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = [values[0] for _, values in expanded]
        cfg = compose("config", overrides=base, return_hydra_config=True)
        swept = [(k, v) for k, v in expanded if len(v) > 1]
        if multirun:
            cli_keys = {k.lstrip("+~") for k, _ in expanded}
            params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
            for key, value in params.items():
                if key not in cli_keys:
                    swept += _expand([f"{key}={value}"])
        elif swept:
            raise ConfigError(f"{swept[0][1][0].split('=')[0]}: several values need -m (multirun)")
        keys = [k for k, _ in expanded]

        def with_value(key, value):
            out = [value if k == key else b for k, b in zip(keys, base)]
            return out if key in keys else out + [value]

        variants = [base] + [with_value(k, v) for k, values in swept for v in values]
        for overrides_ in variants:
            point = compose("config", overrides=overrides_)
            validate(point)
            if not multirun and (problem := point_problem(point) or _device_problem(point)):
                raise ConfigError(problem)
    return math.prod(len(v) for _, v in swept) if multirun else 1


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg) -> None:
    from hstu_exp.runner import run_point, sweep_started, sweep_total

    hc = HydraConfig.get()
    job_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    sweep_dir = Path(hc.sweep.dir) if multirun else None
    group = (sweep_dir or job_dir).name
    validate(cfg)
    if multirun:
        _sweep.update(dir=sweep_dir, logger=OmegaConf.to_container(cfg.logger, resolve=True))
    record = run_point(cfg, job_dir=job_dir, group=group,
                       point=hc.job.num if multirun else 0,
                       total=sweep_total() if multirun else 1,
                       sweep_dir=sweep_dir, started=sweep_started())
    _failed.append(record["status"] == "failed")
    if not multirun:
        from hstu_exp.report.console import print_summary

        print_summary([record])


def _exit_after_interrupt(status: int) -> None:
    # A KeyboardInterrupt that surfaced inside code a C extension evaluated (pybind11's exec)
    # leaves CPython's "unhandled Ctrl-C" flag set even though we caught it, and `python -m`
    # then ends by SIGINT whatever status sys.exit gives. Run the exit hooks (W&B's among
    # them) ourselves and leave with our status.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def main() -> None:
    args = sys.argv[1:]
    if not _PASS_THROUGH.intersection(args):
        try:
            points = preflight(args)
        except Exception as exc:  # noqa: BLE001 - bad input: one line, no traceback
            msg = str(exc) if isinstance(exc, ConfigError) else _one_line(exc)
            print(f"hstu-exp: error: {msg}", file=sys.stderr)
            sys.exit(2)
        os.environ["HSTU_EXP_POINTS"] = str(points)
        os.environ.setdefault("HSTU_EXP_STARTED", str(time.time()))
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)
    try:
        app()
    except (KeyboardInterrupt, SystemExit):
        if not _stop:
            raise
    if _stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the close-out finish
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("hstu-exp: interrupted; finished records are on disk", file=sys.stderr, flush=True)
        if _sweep:  # the close-out still runs, on what the sweep dir holds
            from hstu_exp.report.callback import close_out

            close_out(_sweep["dir"], logger=_sweep["logger"])
        elif "-m" in args or "--multirun" in args:
            print("hstu-exp: no point ran in this process (with Slurm, submitted jobs go on: "
                  "scancel them, or close out later with scripts/plot_sweep.py SWEEP_DIR --csv)",
                  file=sys.stderr)
        _exit_after_interrupt(128 + _stop[0])
    if any(_failed):
        sys.exit(1)


if __name__ == "__main__":
    main()

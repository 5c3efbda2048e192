"""`hstu-exp`: a Hydra app with a preflight.

Before Hydra starts, every value of every swept key is composed and validated once, so bad input
stops with one line naming the key and value (exit 2) before anything is written: unknown keys
(also when added with `+` / `++`), an experiment's grid run without `-m`, an output dir that
cannot be written, a sweep dir that already holds records (without `resume=true`), e2e without
TorchRec. A single run also checks the combination of keys; in a sweep an impossible combination
becomes a `skipped` record instead. Exit status 1 when any point failed or a record could not be
written, 128 + signal when interrupted.
"""
from __future__ import annotations

import atexit
import importlib.util
import math
import os
import signal
import sys
import tempfile
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
from hstu_exp.tracking.records import RecordWriteError



def _conf_dir() -> Path:
    # An installed package carries the configs as hstu_exp/conf (pyproject maps conf/ there); a
    # source tree has them in conf/ beside the package.
    here = Path(__file__).resolve().parent
    return next((d for d in (here / "conf", here.parent / "conf") if (d / "config.yaml").is_file()),
                here.parent / "conf")


CONF_DIR = _conf_dir()
register_configs()

# Process-wide by necessity: Hydra calls the task function once per point and hands nothing back
# that main could aggregate, and a signal handler reaches only module state. main reads these
# after Hydra returns, for the exit status and for the close-out of a stopped sweep.
_failed = []  # statuses of this process's points, for the exit code
_sweep = {}  # sweep dir and logger of the points run in this process, for a close-out on Ctrl-C
_unwritable = []  # the one-line cause when a record could not be written


class _StopSweep(BaseException):
    """Ends the sweep from inside a point: Hydra's launcher records an Exception as the job's
    result and goes on, so only a BaseException stops the remaining points."""


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


def _unknown_added_keys(expanded) -> None:
    """`+key=v` / `++key=v` bypass the schema's unknown-key check: hold them to it here. A config
    group (`+experiment=x`) is a legitimate addition."""
    added = [k.lstrip("+") for k, _ in expanded if k.startswith("+")]
    if not added:
        return
    plain = [v[0] for k, v in expanded if not k.startswith("+")]
    cfg = compose("config", overrides=plain)
    for key in added:
        if (CONF_DIR / key).is_dir():
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not OmegaConf.is_dict(node) or leaf not in node:
            raise ConfigError(f"{key}: unknown key")


def _grid_without_multirun(cfg, expanded) -> None:
    """An experiment's grid runs only with -m; without it Hydra would quietly run one point."""
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    cli_keys = {k.lstrip("+~") for k, _ in expanded}
    left = [k for k in params if k not in cli_keys]
    if left:
        points = math.prod(len(_expand([f"{k}={params[k]}"])[0][1]) for k in left)
        experiment = OmegaConf.select(cfg, "hydra.runtime.choices.experiment")
        what = f"experiment={experiment}" if experiment else cfg.name
        raise ConfigError(f"{what}: sweeps {', '.join(left)} ({points} points): add -m to run "
                          f"the grid, or set {'that key' if len(left) == 1 else 'those keys'} "
                          "to run one point")


def _output_dir_problem(path: Path):
    """Why `path` cannot be made and written, or None. Leaves nothing behind."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        os.rmdir(tempfile.mkdtemp(dir=probe, prefix=".hstu-exp-probe-"))
    except OSError as exc:
        return f"cannot write in {probe} ({exc.strerror or exc})"
    return None


def _check_output_dir(cfg, multirun: bool, dir_given: bool) -> None:
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(OmegaConf.select(cfg, key))
    if (problem := _output_dir_problem(path)) is not None:
        raise ConfigError(f"{key}={path}: {problem}")
    # A sweep dir named on the command line may hold an earlier sweep: its records would be mixed
    # into this sweep's table. Only resume=true may continue it.
    earlier = [path / "results.jsonl", *path.glob("*/results.jsonl")] if path.is_dir() else []
    if multirun and dir_given and not cfg.resume and any(p.is_file() for p in earlier):
        raise ConfigError(f"{key}={path}: holds the records of an earlier sweep; add resume=true "
                          "to continue it, or choose a new hydra.sweep.dir")


def _missing_e2e_packages(cfg):
    if cfg.workload.name not in ("e2e", "serve"):  # the workloads with TorchRec embeddings
        return None
    missing = [name for name, module in (("torchrec", "torchrec"), ("fbgemm-gpu", "fbgemm_gpu"))
               if importlib.util.find_spec(module) is None]
    if missing:
        return (f"workload={cfg.workload.name}: needs {' and '.join(missing)}, which "
                f"{'is' if len(missing) == 1 else 'are'} not installed (scripts/setup_env.sh "
                "installs them; see the README's install section)")
    return None


def preflight(args) -> int:
    """Validate; return the number of points (1 for a single run)."""
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-")]
    every = _expand(overrides)
    expanded = [(k, v) for k, v in every if not k.lstrip("+~").startswith("hydra.")]
    dir_given = any(k.lstrip("+~") == "hydra.sweep.dir" for k, _ in every)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        _unknown_added_keys(expanded)
        base = [values[0] for _, values in expanded]
        hydra_keys = [v[0] for k, v in every if k.lstrip("+~").startswith("hydra.")]
        cfg = compose("config", overrides=base + hydra_keys, return_hydra_config=True)
        swept = [(k, v) for k, v in expanded if len(v) > 1]
        if multirun:
            cli_keys = {k.lstrip("+~") for k, _ in expanded}
            params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
            for key, value in params.items():
                if key not in cli_keys:
                    swept += _expand([f"{key}={value}"])
        elif swept:
            raise ConfigError(f"{swept[0][1][0].split('=')[0]}: several values need -m (multirun)")
        else:
            _grid_without_multirun(cfg, expanded)
        keys = [k for k, _ in expanded]

        def with_value(key, value):
            out = [value if k == key else b for k, b in zip(keys, base)]
            return out if key in keys else out + [value]

        variants = [base] + [with_value(k, v) for k, values in swept for v in values]
        for overrides_ in variants:
            point = compose("config", overrides=overrides_)
            validate(point)
            if problem := _missing_e2e_packages(point):
                raise ConfigError(problem)
            if not multirun and (problem := point_problem(point) or _device_problem(point)):
                raise ConfigError(problem)
        _check_output_dir(cfg, multirun, dir_given)
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
    try:
        record = run_point(cfg, job_dir=job_dir, group=group,
                           point=hc.job.num if multirun else 0,
                           total=sweep_total() if multirun else 1,
                           sweep_dir=sweep_dir, started=sweep_started())
    except RecordWriteError as exc:  # the promise is a record per point: stop rather than lose more
        _unwritable.append(str(exc))
        raise _StopSweep from None
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
    except _StopSweep:
        pass
    except (KeyboardInterrupt, SystemExit):
        if not _stop:
            raise
    if _unwritable:
        print(f"hstu-exp: error: {_unwritable[0]}; the sweep stopped", file=sys.stderr, flush=True)
        if not _stop:
            _close_out_after_stop(args)
        sys.exit(1)
    if _stop:
        print("hstu-exp: interrupted; finished records are on disk", file=sys.stderr, flush=True)
        _close_out_after_stop(args)
        _exit_after_interrupt(128 + _stop[0])
    if any(_failed):
        sys.exit(1)


def _abandon_close_out(signum, frame):
    print("hstu-exp: close-out abandoned (second signal); the records are on disk",
          file=sys.stderr, flush=True)
    _exit_after_interrupt(128 + (_stop[0] if _stop else signum))


def _close_out_after_stop(args) -> None:
    """The close-out of a sweep that did not reach its end: it covers what the sweep dir holds. A
    second Ctrl-C / SIGTERM ends it at once."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _abandon_close_out)
    if _sweep:
        from hstu_exp.report.callback import close_out

        try:
            close_out(_sweep["dir"], logger=_sweep["logger"])
        except SystemExit:  # it said what went wrong in one line; the exit status is ours
            pass
    elif "-m" in args or "--multirun" in args:
        print("hstu-exp: no point ran in this process (with Slurm, submitted jobs go on: "
              "scancel them, or close out later with scripts/plot_sweep.py SWEEP_DIR --csv)",
              file=sys.stderr)


if __name__ == "__main__":
    main()

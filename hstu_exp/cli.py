"""`hstu-exp`: a Hydra app with a preflight.

Before Hydra starts, every value of every swept key is composed and validated once, so bad input
stops with one line naming the key and value (exit 2) before anything is written: unknown keys
(also when added with `+` / `++`), an experiment's grid run without `-m`, an output dir that
cannot be written, a sweep dir that already holds records (without `resume=true`), e2e without
TorchRec. A single run also checks the combination of keys; in a sweep an impossible combination
becomes a `skipped` record instead. Exit status 1 when any point failed or a record could not be
written, 128 + signal when interrupted.

A sweep dir (and a single run's dir) is claimed before Hydra starts: a default one named by the
second gets a `-2`, `-3` suffix when another hstu-exp took that name first, and a sweep holds a
lock on its dir while it runs, so a second sweep into the same dir is refused.
"""

from __future__ import annotations

import atexit
import fcntl
import importlib.util
import math
import os
import shutil
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

from hstu_exp.config import ConfigError, device_problem, point_problem, register_configs, validate
from hstu_exp.gpus import gpus_problem
from hstu_exp.runner import STOP as _stop  # signals received, for the exit code
from hstu_exp.tracking.records import RecordWriteError


def _conf_dir() -> Path:
    # An installed package carries the configs as hstu_exp/conf (pyproject maps conf/ there); a
    # source tree has them in conf/ beside the package.
    here = Path(__file__).resolve().parent
    return next(
        (d for d in (here / "conf", here.parent / "conf") if (d / "config.yaml").is_file()),
        here.parent / "conf",
    )


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


# Flags that hand control to Hydra's own reporting (printing config, shell completion, ...).
_PASS_THROUGH = {
    "--hydra-help",
    "-i",
    "--info",
    "--shell-completion",
    "-sc",
    "-cp",
    "--config-path",
    "-cn",
    "--config-name",
    "-cd",
    "--config-dir",
    "--experimental-rerun",
    "-p",
    "--package",
    "--resolve",
}
_PRINT_CONFIG = {"-c", "--cfg"}  # validated first, then Hydra prints the config

HELP = """\
hstu-exp: GPU inference experiments for HSTU (paged KV cache, Triton kernels, CUDA graphs).
Each run times one point (model x cache x kernel x graph x workload) and writes its record.

usage: hstu-exp [-m] [GROUP=OPTION ...] [KEY=VALUE ...]

  hstu-exp                                   one point with the defaults (tiny model, block)
  hstu-exp model=seed workload.batch_size=8  choose a group option, set any key
  hstu-exp -m workload.batch_size=1,2,4      -m: a sweep, one point per value (a grid when
                                             several keys have several values)
  hstu-exp -m experiment=quick               a preset sweep
  hstu-exp -m ... resume=true hydra.sweep.dir=DIR   finish an interrupted sweep

groups and their options:
{groups}

where results go:
  one run:  outputs/runs/<date>_<time>_<name>/results.jsonl   (hydra.run.dir=DIR)
  a sweep:  outputs/multirun/<date>_<time>_<name>/<k>/results.jsonl, and at its end
            results.csv, speedups.csv and figures/ in the sweep dir   (hydra.sweep.dir=DIR)
  W&B runs: offline under each job dir (logger=none turns W&B off)

flags:  -m/--multirun  --cfg job (print the composed config)  --version  --hydra-help
more:   README.md; hstu-exp-compare A B (two sweeps); hstu-exp-wandb DIR (import to W&B)
"""


def _options(group: str) -> list:
    """A group's selectable options: its yaml files (the `*_schema` bases are not options)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _help() -> str:
    groups = [
        g
        for g in ("model", "cache", "kernel", "graph", "workload", "logger", "experiment")
        if (CONF_DIR / g).is_dir()
    ]
    return HELP.format(groups="\n".join(f"  {g + ':':<12}{', '.join(_options(g))}" for g in groups))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from hstu_exp import __version__

    try:
        return f"hstu-exp {version('hstu-exp')}"
    except PackageNotFoundError:  # a source tree that was never installed
        return f"hstu-exp {__version__}"


def _one_line(exc: BaseException) -> str:
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        shown = [o for o in exc.options or [] if not o.endswith("_schema")]
        options = f" (available: {', '.join(shown)})" if shown else ""
        return f"{group}={option}: no such option{options}"
    if isinstance(exc, OverrideParseException):
        return f"{exc.override}: {_parse_hint(exc.override)}"
    if str(exc).startswith("Multiple values for "):  # `+group=x` where the defaults name group
        group = str(exc).split()[3].rstrip(".")
        return f"+{group}: {group} is already in the defaults: write {group}=<option> (no +)"
    chain, cause = [exc], exc  # every exception behind this one, for a YAML error's position
    while (cause := cause.__cause__ or cause.__context__) is not None and len(chain) < 10:
        chain.append(cause)
    if (
        mark := next(
            (getattr(c, "problem_mark", None) for c in chain if getattr(c, "problem_mark", None)), None
        )
    ) is not None:
        yaml_error = next(c for c in chain if getattr(c, "problem_mark", None) is mark)
        what = " ".join(
            x for x in (yaml_error.problem, f"({yaml_error.context})" if yaml_error.context else "") if x
        )
        return f"{mark.name}, line {mark.line + 1}: {what}"
    # the reason: the end of the __cause__ chain, or (Hydra composing a group file) the first
    # exception behind it that names a key
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    if not getattr(cause, "full_key", None):
        cause = next((c for c in chain if getattr(c, "full_key", None)), cause)
    key = getattr(cause, "full_key", None)
    msg = getattr(cause, "msg", None) or str(cause)
    msg = msg.strip().splitlines()[0] if msg.strip() else type(cause).__name__
    if key and ("not in struct" in msg or msg.startswith(f"Key '{key.split('.')[-1]}' not in")):
        msg = "unknown key"
    where = str(exc).strip().splitlines()[0] if cause is not exc and str(exc).strip() else ""
    if where.endswith("raised while composing config:"):  # Hydra's "In 'model/x': ..."
        where = where.split(":")[0]
    elif key:
        where = ""
    text = f"{key}: {msg}" if key else msg
    return f"{where}: {text}" if where else text


def _parse_hint(override: str) -> str:
    """What to do about an override Hydra's grammar cannot read."""
    value = override.partition("=")[2]
    if value.startswith("~"):
        return "the shell did not expand ~ here: write $HOME/... or an absolute path"
    if any(c.isspace() or not c.isascii() for c in value):
        return (
            f"spaces and non-ASCII letters need quotes: '{override.partition('=')[0]}=\"...\"' "
            "(the outer quotes are for the shell)"
        )
    return "Hydra cannot read this value (brackets, quotes and commas must pair up)"


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
    from hstu_exp.config import memory_problem
    from hstu_exp.env import memory_bytes, resolve_device

    device = resolve_device(cfg.device)
    problem = device_problem(cfg) if device.type != "cuda" else None
    return problem or memory_problem(cfg, memory_bytes(device))


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
        raise ConfigError(
            f"{what}: sweeps {', '.join(left)} ({points} points): add -m to run "
            f"the grid, or set {'that key' if len(left) == 1 else 'those keys'} "
            "to run one point"
        )


def _output_dir_problem(path: Path):
    """Why `path` cannot be made and written, or None. Leaves nothing behind. The probe writes
    a little data, since a full disk still lets a directory be made."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is not a directory"
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".hstu-exp-probe-")
        try:
            os.write(fd, b"\0" * 65536)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        return f"cannot write in {probe} ({exc.strerror or exc})"
    return None


def _check_output_dir(cfg, multirun: bool) -> None:
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if not str(OmegaConf.select(cfg, key) or "").strip():  # Path("") is the current dir
        raise ConfigError(f"{key}=: empty; name a dir (the current one is ./<name>)")
    path = Path(OmegaConf.select(cfg, key))
    if (problem := _output_dir_problem(path)) is not None:
        raise ConfigError(f"{key}={path}: {problem}")


def _quoted(value: str) -> str:
    """A value as a quoted Hydra override value (spaces, accents and `=` survive)."""
    return "'" + value.replace("'", "\\'") + "'"


def _claim_dir(path: Path) -> Path:
    """A default output dir (named by the second) made for this process alone: when another
    hstu-exp started in the same second took the name, the next free `<name>-2`, `-3`, ..."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise ConfigError(f"{path}: 999 runs already started with this name in this second")


def _lock_sweep_dir(path: Path, key: str) -> int:
    """Holds `<sweep dir>/.hstu-exp.lock` for this process's life: a second sweep into the
    same dir is refused while this one runs (the kernel drops the lock when the process ends,
    however it ends)."""
    fd = os.open(path / ".hstu-exp.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"{key}={path}: another hstu-exp sweep (pid {holder}) is writing "
            "into it; wait for it to end, or choose another hydra.sweep.dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _older_schema(path: Path):
    """The schema version of a record under `path` that this hstu-exp does not write, or None."""
    from hstu_exp.runner import SCHEMA_VERSION
    from hstu_exp.tracking.records import read_records

    return next(
        (v for r in read_records(path) if (v := r.get("schema_version", 1)) != SCHEMA_VERSION), None
    )


def _claim_output_dir(cfg, multirun: bool, dir_given: bool):
    """(override naming the dir Hydra is to use or None, lock fd or None). A sweep dir named on
    the command line may hold an earlier sweep: only resume=true may continue it, and only one
    recorded by this schema (an older one would have its points run again beside the old
    records, since a point's key changed with the schema)."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    path = Path(OmegaConf.select(cfg, key))
    override = None
    if not dir_given:
        path = _claim_dir(path)
        override = f"{key}={_quoted(str(path))}"
    if not multirun:
        return override, None
    path.mkdir(parents=True, exist_ok=True)
    lock = _lock_sweep_dir(path, key)
    earlier = [path / "results.jsonl", *path.glob("*/results.jsonl")]
    if any(p.is_file() for p in earlier):
        if not cfg.resume:
            raise ConfigError(
                f"{key}={path}: holds the records of an earlier sweep; add "
                "resume=true to continue it, or choose a new hydra.sweep.dir"
            )
        if (old := _older_schema(path)) is not None:
            from hstu_exp.runner import SCHEMA_VERSION

            raise ConfigError(
                f"{key}={path}: recorded with record schema {old}, this hstu-exp "
                f"writes schema {SCHEMA_VERSION}; resume=true cannot tell its "
                "points apart: start a new hydra.sweep.dir (the old records stay "
                "readable by hstu-exp-compare and scripts/plot_sweep.py)"
            )
    return override, lock


def _schema_option(expanded) -> None:
    """The `<group>_schema` entries are the groups' bases, not options to choose."""
    for key, values in expanded:
        group = key.lstrip("+~")
        for value in values:
            option = value.partition("=")[2]
            if (CONF_DIR / group).is_dir() and option.endswith("_schema"):
                raise ConfigError(
                    f"{group}={option}: no such option (available: {', '.join(_options(group))})"
                )


def _subdir_problem(every, points: int):
    """A job subdir that does not vary by job puts every point's records in one dir."""
    given = [v[0].partition("=")[2] for k, v in every if k.lstrip("+~") == "hydra.sweep.subdir"]
    if points > 1 and given and "${hydra.job.num}" not in given[0]:
        return (
            f"hydra.sweep.subdir={given[0]}: every point would write into the same job dir; "
            "keep ${hydra.job.num} in it"
        )
    if given and given[0].startswith("/"):
        return f"hydra.sweep.subdir={given[0]}: a dir inside the sweep dir, not an absolute path"
    return None


def _sweep_values_problem(swept):
    """A swept key with no value, or with one value twice (the same point would run twice)."""
    for key, values in swept:
        if not values:
            return f"{key}: the sweep gives it no values"
        seen = set()
        for value in values:
            if value in seen:
                return f"{value}: given twice (the same point would run twice)"
            seen.add(value)
    return None


def _resume_problem(cfg, multirun: bool, dir_given: bool):
    if not cfg.resume:
        return None
    if not multirun:
        return "resume=true: continues a sweep: add -m and hydra.sweep.dir=<the sweep's dir>"
    if not dir_given:
        return (
            "resume=true: name the sweep to continue with hydra.sweep.dir=<its dir> (a "
            "sweep without one gets a new dir)"
        )
    return None


def _slurm_problem(cfg):
    target = OmegaConf.select(cfg, "hydra.launcher._target_") or ""
    if "Slurm" in target and shutil.which("sbatch") is None:
        return (
            "hydra/launcher=slurm: no Slurm on this machine (sbatch is not on PATH); run "
            "from a Slurm login node, or drop hydra/launcher=slurm to run the points here"
        )
    return None


def _missing_e2e_packages(cfg):
    if cfg.workload.name not in ("e2e", "serve"):  # the workloads with TorchRec embeddings
        return None
    missing = [
        name
        for name, module in (("torchrec", "torchrec"), ("fbgemm-gpu", "fbgemm_gpu"))
        if importlib.util.find_spec(module) is None
    ]
    if missing:
        return (
            f"workload={cfg.workload.name}: needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed (scripts/setup_env.sh "
            "installs them; see the README's install section)"
        )
    return None


def _point_configs(base: list, swept: list):
    """The composed config of the base point, then of each swept value (the base with that one
    value). A value of a plain key is set on a copy of the base config, where the schema checks
    its type, instead of composing the whole config again (Hydra takes a sixth of a second a
    composition): a 300-value sweep is checked in a second. A group option, an added or deleted
    key compose in full."""
    import copy

    base_cfg = compose("config", overrides=base)
    yield base_cfg
    keys = [k for k, _ in _expand(base)]
    for key, values in swept:
        plain = (
            not key.startswith(("+", "~"))
            and not (CONF_DIR / key).is_dir()
            and "/" not in key
            and OmegaConf.select(base_cfg, key, default="\0absent") != "\0absent"
        )
        for value in values:
            if plain:
                cfg = copy.deepcopy(base_cfg)
                parsed = OverridesParser.create().parse_overrides([value])[0]
                OmegaConf.update(cfg, key, parsed.value(), merge=False)
                yield cfg
            else:
                with_value = [value if k == key else b for k, b in zip(keys, base)]
                yield compose("config", overrides=with_value if key in keys else base + [value])


def preflight(args):
    """Validate; claim the output dir. Returns (number of points, extra overrides for Hydra,
    the sweep dir's lock fd or None)."""
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-")]
    every = _expand(overrides)
    expanded = [(k, v) for k, v in every if not k.lstrip("+~").startswith("hydra.")]
    dir_given = any(
        k.lstrip("+~") == ("hydra.sweep.dir" if multirun else "hydra.run.dir") for k, _ in every
    )
    _schema_option(every)
    if problem := _sweep_values_problem(every):
        raise ConfigError(problem)
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
            _schema_option(swept)
            if problem := (
                _sweep_values_problem(swept)
                or _slurm_problem(cfg)
                or gpus_problem(OmegaConf.select(cfg, "hydra.launcher"))
            ):
                raise ConfigError(problem)
        elif swept:
            raise ConfigError(f"{swept[0][1][0].split('=')[0]}: several values need -m (multirun)")
        else:
            _grid_without_multirun(cfg, expanded)
        if problem := _resume_problem(cfg, multirun, dir_given):
            raise ConfigError(problem)
        points = math.prod(len(v) for _, v in swept) if multirun else 1
        if multirun and (problem := _subdir_problem(every, points)):
            raise ConfigError(problem)
        checks = 1 + sum(len(v) for _, v in swept)
        if checks > 50:
            print(f"[hstu-exp] {points} points: checking {checks} values", flush=True)
        for point in _point_configs(base, swept):
            validate(point)
            if problem := _missing_e2e_packages(point):
                raise ConfigError(problem)
            if not multirun and (problem := point_problem(point) or _device_problem(point)):
                raise ConfigError(problem)
        _check_output_dir(cfg, multirun)
        override, lock = _claim_output_dir(cfg, multirun, dir_given)
    return points, [override] if override else [], lock


def _print_config(args) -> None:
    """`--cfg job|hydra|all`: the same checks as a run (a typo is one line), then Hydra prints;
    with -m Hydra has no single config to print."""
    if "-m" in args or "--multirun" in args:
        raise ConfigError(
            "--cfg prints the config of one run: drop -m (with a sweep, give one "
            "value of each swept key)"
        )
    overrides = [a for a in args if not a.startswith("-") and a not in ("job", "hydra", "all")]
    every = _expand(overrides)
    _schema_option(every)
    expanded = [(k, v) for k, v in every if not k.lstrip("+~").startswith("hydra.")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        _unknown_added_keys(expanded)
        validate(compose("config", overrides=overrides))


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def app(cfg) -> str:
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
        record = run_point(
            cfg,
            job_dir=job_dir,
            group=group,
            point=hc.job.num if multirun else 0,
            total=sweep_total() if multirun else 1,
            sweep_dir=sweep_dir,
            started=sweep_started(),
        )
    except RecordWriteError as exc:  # the promise is a record per point: stop rather than lose more
        _unwritable.append(str(exc))
        raise _StopSweep(str(exc)) from None
    _failed.append(record["status"] == "failed")
    if not multirun:
        from hstu_exp.report.console import print_summary

        print_summary([record])
        print(f"[hstu-exp] record: {job_dir / 'results.jsonl'}", flush=True)
    return record["status"]  # for a launcher whose points run in other processes


def sweep_in_workers(sweep_dir, logger) -> None:
    """hydra/launcher=gpus (hstu_exp.gpu_launch) runs the points in worker processes: a stop
    closes out this sweep dir."""
    _sweep.update(dir=Path(sweep_dir), logger=logger)


def points_ran_in_workers(outcomes) -> None:
    """The outcomes of points that ran in worker processes (hstu_exp.gpu_launch) count as if
    they had run here: failed points for the exit status; an interrupted point or a record that
    could not be written stops the sweep the same way."""
    _failed.extend(o.get("status") == "failed" for o in outcomes)
    signals = [o["signal"] for o in outcomes if o.get("signal")]
    if signals and not _stop:
        _stop.append(signals[0])
    if _stop:
        raise KeyboardInterrupt
    stops = [o["stop"] for o in outcomes if o.get("stop")]
    if stops:
        _unwritable.append(stops[0])
        raise _StopSweep(stops[0])


def _exit_after_interrupt(status: int) -> None:
    # A KeyboardInterrupt that surfaced inside code a C extension evaluated (pybind11's exec)
    # leaves CPython's "unhandled Ctrl-C" flag set even though we caught it, and `python -m`
    # then ends by SIGINT whatever status sys.exit gives. Run the exit hooks (W&B's among
    # them) ourselves and leave with our status.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _error(msg: str, status: int = 2):
    print(f"hstu-exp: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(status)


def main() -> None:
    args = sys.argv[1:]
    if "-h" in args or "--help" in args:
        print(_help(), end="")
        return
    if "--version" in args:
        print(_version())
        return
    lock = None  # held (open) until the process ends
    try:
        if _PRINT_CONFIG.intersection(args):
            _print_config(args)
        elif not _PASS_THROUGH.intersection(args):
            points, extra, lock = preflight(args)
            sys.argv += extra
            os.environ["HSTU_EXP_POINTS"] = str(points)
            os.environ.setdefault("HSTU_EXP_STARTED", str(time.time()))
    except KeyboardInterrupt:
        _error("interrupted while checking the config; nothing was run", 130)
    except Exception as exc:  # noqa: BLE001 - bad input: one line, no traceback
        _error(str(exc) if isinstance(exc, ConfigError) else _one_line(exc))
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
    del lock


def _abandon_close_out(signum, frame):
    print(
        "hstu-exp: close-out abandoned (second signal); the records are on disk",
        file=sys.stderr,
        flush=True,
    )
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
        print(
            "hstu-exp: no point ran in this process (with Slurm, submitted jobs go on: "
            "scancel them, or close out later with scripts/plot_sweep.py SWEEP_DIR --csv)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()

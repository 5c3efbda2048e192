"""Imported first by the scripts: makes the source tree importable and, when the Python that
started a script lacks the project's packages (`scripts/goals.py ...` from a plain shell), runs
the script again under the project's .venv."""

import os
import signal
import sys
from pathlib import Path

# `scripts/goals.py SWEEP | head` should stop quietly, as other command-line tools do.
signal.signal(signal.SIGPIPE, signal.SIG_DFL)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _project_pythons():
    """Where the project's interpreter may live: the active virtualenv, this checkout's .venv, and,
    when this checkout is a git worktree (its .git is a file naming the main repository's
    .git/worktrees/NAME), the main checkout's .venv, which worktrees share."""
    if os.environ.get("VIRTUAL_ENV"):
        yield Path(os.environ["VIRTUAL_ENV"]) / "bin" / "python"
    yield ROOT / ".venv" / "bin" / "python"
    dot_git = ROOT / ".git"
    if dot_git.is_file():
        gitdir = Path(dot_git.read_text().split("gitdir:", 1)[-1].strip())
        commondir = gitdir / "commondir"
        if commondir.exists():
            main_git = (gitdir / commondir.read_text().strip()).resolve()
            yield main_git.parent / ".venv" / "bin" / "python"


try:
    import pandas  # noqa: F401  (the scripts need it, and hstu_exp's report modules)
except ImportError:
    if not os.environ.get("HSTU_EXP_REEXEC"):
        for _python in _project_pythons():
            if _python.exists():
                os.environ["HSTU_EXP_REEXEC"] = "1"
                os.execv(str(_python), [str(_python), *sys.argv])
    sys.exit(
        f"{Path(sys.argv[0]).name}: error: pandas is missing: install the project "
        "(make setup) and run with .venv/bin/python"
    )

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

try:
    import pandas  # noqa: F401  (the scripts need it, and hstu_exp's report modules)
except ImportError:
    _venv = ROOT / ".venv" / "bin" / "python"
    if _venv.exists() and not os.environ.get("HSTU_EXP_REEXEC"):
        os.environ["HSTU_EXP_REEXEC"] = "1"
        os.execv(str(_venv), [str(_venv), *sys.argv])
    sys.exit(f"{Path(sys.argv[0]).name}: error: pandas is missing: install the project "
             "(make setup) and run with .venv/bin/python")

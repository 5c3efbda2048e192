#!/usr/bin/env python3
"""Compare two sweeps: ratio table (median, p90, memory, floor fraction) with the geometric mean,
95 % intervals of the median ratio, flagged regressions, a figure; optionally a gate on
regressions. Same as `hstu-exp-compare`.

    scripts/compare.py SWEEP_A SWEEP_B
    scripts/compare.py BASE NEW --fail-above 1.05   # exit 1 when a point is slower with confidence
    scripts/compare.py --help
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a source tree too
try:
    import pandas  # noqa: F401
except ImportError:  # started as `scripts/compare.py` by a python without the packages
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists() and not os.environ.get("HSTU_EXP_REEXEC"):
        os.environ["HSTU_EXP_REEXEC"] = "1"
        os.execv(str(venv), [str(venv), *sys.argv])
    sys.exit("compare.py: error: pandas is missing: install the project (make setup) and run "
             "with .venv/bin/python")

from hstu_exp.report.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

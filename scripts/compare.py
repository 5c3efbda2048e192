#!/usr/bin/env python3
"""Compare two sweeps: ratio table (median, p90, memory, floor fraction) with the geometric mean,
flagged regressions, a figure; optionally a gate on regressions. Same as `hstu-exp-compare`.

    .venv/bin/python scripts/compare.py SWEEP_A SWEEP_B
    .venv/bin/python scripts/compare.py BASE NEW --fail-above 1.05   # exit 1 on a slower point
    .venv/bin/python scripts/compare.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a source tree too

from hstu_exp.report.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

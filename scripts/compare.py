#!/usr/bin/env python3
"""Compare two sweeps: ratio table (median, p90, memory, floor fraction) with the geometric mean,
95 % intervals of the median ratio, flagged regressions, a figure; optionally a gate on
regressions. Same as `hstu-exp-compare`.

    scripts/compare.py SWEEP_A SWEEP_B
    scripts/compare.py BASE NEW --fail-above 1.05   # exit 1 when a point is slower with confidence
    scripts/compare.py --help
"""

import sys

import _venv  # noqa: F401,E402  (source tree on the path; re-run under .venv if needed)

from hstu_exp.report.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

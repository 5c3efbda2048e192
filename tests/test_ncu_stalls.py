"""scripts/ncu_stalls.py: the warp-stall summary of an Nsight Compute source-page export, on a
small export written here in ncu's CSV shape (a kernel-name line, then the column names)."""

import csv
import subprocess
import sys

from helpers import ROOT

COLUMNS = [
    "Address",
    "Source",
    "Warp Stall Sampling (All Samples)",
    "Instructions Executed",
    "stall_long_sb",
    "stall_barrier",
    "stall_math",
    "stall_long_sb (Not Issued)",
]
SASS = [  # a prologue run once, a loop body run 10 times, an epilogue once
    ("LDG.E R4, desc[UR4][R2.64]", 2, 8, 0, 0, 2),
    ("IMAD.MOV.U32 R5, RZ, RZ, R4", 10, 8, 10, 0, 0),
    ("DEPBAR.LE SB0, 0x0", 5, 80, 0, 5, 0),
    ("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", 60, 80, 20, 0, 40),
    ("@P0 BRA 0x100", 3, 80, 0, 3, 0),
    ("STG.E [R2.64], R24", 20, 8, 0, 0, 20),
]


def write_export(path):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "_hstu_fwd"])
        w.writerow(COLUMNS)
        for i, (src, samples, runs, long_sb, barrier, math) in enumerate(SASS):
            w.writerow([hex(16 * i), src, samples, runs, long_sb, barrier, math, long_sb])


def test_regions_reasons_and_opcodes(tmp_path):
    export = tmp_path / "k_sass.csv"
    write_export(export)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ncu_stalls.py"), str(export)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "100 samples, 6 instructions" in out
    # 30 long_sb, 8 barrier, 62 math of 100 samples; "Not Issued" columns are not counted again
    assert "stall reasons: math 62.0%, long_sb 30.0%, barrier 8.0%" in out
    assert "| 0-1 | 8 | 12.0% | LDG.E x1, IMAD.MOV.U32 x1 |" in out
    assert "| 2-4 | 80 | 68.0% |" in out  # the loop body
    assert "| 5-5 | 8 | 20.0% | STG.E x1 |" in out
    assert "| HGMMA.64x64x16.F32.BF16 | 60.0% | math 40.0%, long_sb 20.0% |" in out
    assert "| BRA | 3.0% |" in out  # the predicate is not the opcode


def test_not_a_source_export_is_one_line_error(tmp_path):
    bad = tmp_path / "details.csv"
    bad.write_text('"ID","Metric Name"\n"0","Duration"\n')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ncu_stalls.py"), str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "no 'Warp Stall Sampling" in proc.stderr

"""scripts/kernel_report.py: the attention kernel compiled ahead of time for Hopper (sm_90a) on a
machine without a GPU. Guards what the H200 speed rests on and a CPU can still see: the key loop's
K/V loads are software-pipelined (asynchronous copies), the products are wgmma, and the tiles fit
the 227 KB of shared memory a block may take; full mode also with its tiles through TMA
descriptors, whose copies count as the loop's asynchronous loads; and the warp-specialised Gluon
kernel (the GPU default in full mode) with its register budget re-balanced between partitions."""

import subprocess
import sys

import pytest
from helpers import ROOT

# Each compiles the attention for sm_90a in a subprocess (tens of seconds on two cores).
pytestmark = pytest.mark.slow


def test_attention_compiles_for_hopper_pipelined_with_wgmma():
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "kernel_report.py"),
            "--modes",
            "full,paged-split,full-tma",
            "--configs",
            "table",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [
        line.split("|")[1:-1]
        for line in proc.stdout.splitlines()
        if line.startswith("| full") or line.startswith("| paged")
    ]
    assert [r[0].strip() for r in rows] == ["full", "paged-split", "full-tma"], proc.stdout
    for mode, tiles, warps, stages, regs, _spills, smem, copies, wgmma, _waits in rows:
        assert tiles.strip() == "128x64" and int(warps) == 8 and int(stages) == 2
        assert 0 < int(regs) <= 255
        assert int(smem) <= 227, f"{mode}: {smem} KB of shared memory"
        assert int(copies) > 0, f"{mode}: the key loop's loads are not pipelined"
        assert int(wgmma) > 0, f"{mode}: no wgmma"


def test_attention_on_e4m3_pages_compiles_for_hopper():
    """cache.dtype=fp8: the paged kernel reading e4m3 K/V and float32 scales (the Hopper kernel
    never does) still pipelines its loads (scales included) into wgmma, within shared memory."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--modes",
         "paged-fp8,paged-split-fp8", "--configs", "table"],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| paged")]
    assert [r[0].strip() for r in rows] == ["paged-fp8", "paged-split-fp8"], proc.stdout
    for mode, tiles, _warps, _stages, regs, _spills, smem, copies, wgmma, _waits in rows:
        assert tiles.strip() == "128x64" and 0 < int(regs) <= 255
        assert int(smem) <= 227, f"{mode}: {smem} KB of shared memory"
        assert int(copies) > 0 and int(wgmma) > 0, f"{mode}: {copies} async copies, {wgmma} wgmma"


def test_hopper_kernel_compiles_warp_specialised(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "kernel_report.py"),
            "--modes",
            "hopper,hopper-paged-split",
            "--dump",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| hopper")]
    assert [r[0].strip() for r in rows] == ["hopper", "hopper-paged-split"], proc.stdout
    for mode, _tiles, _warps, _stages, regs, _spills, smem, copies, wgmma, _waits in rows:
        assert int(regs) * (4 + 4 + 4) * 32 <= 65536, "three warpgroups must fit the register file"
        assert int(smem) <= 227
        assert int(copies) >= 3, f"{mode}: Q, K and V come through TMA"
        # per consumer warpgroup: Q.K^T is D/16 = 16 wgmma of k=16, P.V is 64/16 = 4; two consumers
        assert int(wgmma) == 2 * (16 + 4), proc.stdout
    for ptx in tmp_path.glob("hopper_*.ptx"):
        text = ptx.read_text()
        assert "setmaxnreg.dec" in text and "setmaxnreg.inc" in text, "no register re-balancing"
        assert "cp.async.bulk.tensor" in text and "mbarrier.try_wait" in text
    assert len(list(tmp_path.glob("hopper_*.ptx"))) == 2


def test_unknown_mode_is_one_line_error():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--modes", "fast"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown mode 'fast'" in proc.stderr and "Traceback" not in proc.stderr


def test_hopper_launch_refuses_a_split_in_full_mode():
    """The full-mode schedule is not split-safe: launch asserts before touching the tensors."""
    import pytest

    from hstu_exp.ops import hopper_attention

    with pytest.raises(AssertionError, match="paged mode only"):
        hopper_attention.launch(
            None, None, None, None, None, alpha=1.0, inv_n=1.0, pages=None, chunk=4, splits=2
        )

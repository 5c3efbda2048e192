#!/usr/bin/env python3
"""What the compiler makes of the Triton HSTU attention for a Hopper GPU, without a GPU.

    scripts/kernel_report.py                      # the tuned D=256 configs, full and paged
    scripts/kernel_report.py --modes paged-split --configs table --dump DIR
                                                  # one variant; keep its TTGIR and PTX

Compiles `hstu_exp.ops.triton_attention._hstu_fwd` (mode `hopper`: the warp-specialised Gluon
kernel of `hopper_attention`, whose "regs" are the launch's; its partitions re-balance them with
setmaxnreg) ahead of time for sm_90a with the installed
Triton (the GPU box runs Triton 3.6: install that version in a side directory and put it first on
PYTHONPATH to see what the box compiles), assembles the PTX with the ptxas Triton itself uses, and
prints per variant: registers a thread, spilled bytes, shared memory, whether the key loop's
loads became asynchronous copies (software pipelining), the wgmma count and how many wgmma
waits sit inside the loops. Reading these costs no device time; they answer "did the change
spill, did the pipeliner give up" before a GPU call.

Integer arguments that are strides or pointers are compiled as multiples of 16, as the JIT
specialises them at run time (row strides of 1024, 4096, ...): without that hint the loads are
not known to be 16-byte aligned and the pipeliner leaves them synchronous.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import _venv  # noqa: F401  (source tree on the path; re-run under .venv if needed)

os.environ.pop("TRITON_INTERPRET", None)  # before Triton is imported: compile, not interpret
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hstu_exp.ops import triton_attention as tri  # noqa: E402

PROG = "kernel_report.py"
MODES = (
    "full",
    "full-split",
    "paged",
    "paged-split",
    "paged-fp8",
    "paged-split-fp8",
    "full-tma",
    "full-split-tma",
    "hopper",
    "hopper-paged",
    "hopper-paged-split",
)
POINTERS = {
    "Q",
    "K",
    "V",
    "QD",
    "KD",
    "VD",
    "Out",
    "KP",
    "VP",
    "offsets",
    "num_cand",
    "page_indptr",
    "page_ids",
    "cached_len",
    "KS",
    "VS",
}


def compile_attention(
    cfg: tri.Config,
    *,
    paged: bool,
    split: bool,
    head_dim: int = 256,
    arch: int = 90,
    tma: bool = False,
    fp8: bool = False,
):
    """The kernel compiled for (cfg, mode), bf16 inputs, as `_launch` would specialise it.
    fp8: e4m3 pages (cache.dtype=fp8) with their float32 scales."""
    fn = tri._hstu_fwd
    names = fn.arg_names
    const = dict(
        HEAD_DIM=head_dim,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        PAGED=paged,
        PAGE_SIZE=32 if paged else 1,
        SPLIT=split,
        FAST=True,
        DOT_PRECISION="tf32",
        USE_TMA=tma,
        FP8_KV=fp8,
    )
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n in ("QD", "KD", "VD") and tma:
            rows = cfg.block_m if n == "QD" else cfg.block_n
            sig[n] = f"tensordesc<bf16[{rows},{head_dim}]>"
        elif n == "Out":
            sig[n] = "*fp32" if split else "*bf16"
        elif n in ("offsets", "num_cand", "page_indptr", "page_ids", "cached_len"):
            sig[n] = "*i32"
        elif n in ("KP", "VP") and fp8:
            sig[n] = "*fp8e4nv"
        elif n in ("KS", "VS"):
            sig[n] = "*fp32"
        elif n in POINTERS:
            sig[n] = "*bf16"
        elif n in ("alpha", "inv_n"):
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    aligned = [
        n
        for n in names
        if (n in POINTERS or n.startswith("stride")) and not sig[n].startswith("tensordesc")
    ]
    src = ASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in const.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def compile_hopper(
    cfg: tri.Config,
    *,
    head_dim: int = 256,
    arch: int = 90,
    paged: bool = False,
    split: bool = False,
    page_size: int = 32,
):
    """The warp-specialised Gluon kernel (hopper_attention) compiled for cfg, bf16 in; out bf16,
    or float32 when split."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource

    ha = tri.hopper_attention
    fn = ha._hopper_fwd
    names = fn.arg_names
    const = dict(
        HEAD_DIM=head_dim,
        BLOCK_N=cfg.block_n,
        K_STAGES=cfg.num_stages,
        V_STAGES=2,
        GROUP=ha.GROUP,
        PAGED=paged,
        PAGE_SIZE=page_size if paged else cfg.block_n,
        SPLIT=split,
    )

    def desc(rows):
        layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl.bfloat16)
        return f"tensordesc<bf16[{rows},{head_dim}],{layout!r}>"

    box = min(page_size, cfg.block_n) if paged else cfg.block_n
    sig = {
        n: "constexpr"
        if n in const
        else desc(int(ha.HALF))
        if n == "qd"
        else desc(cfg.block_n)
        if n in ("kd", "vd")
        else desc(box)
        if n in ("kpd", "vpd")
        else ("*fp32" if split else "*bf16")
        if n == "Out"
        else "*i32"
        if n in ("offsets", "num_cand", "cached_len", "page_indptr", "page_ids")
        else "fp32"
        if n in ("alpha", "inv_n")
        else "i32"
        for n in names
    }
    aligned = (
        "Out",
        "offsets",
        "num_cand",
        "cached_len",
        "page_indptr",
        "page_ids",
        "stride_or",
        "stride_oh",
    )
    src = GluonASTSource(
        fn=fn,
        signature=sig,
        constexprs={(names.index(k),): v for k, v in const.items()},
        attrs={(names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    return triton.compile(
        src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, maxnreg=ha.MAXNREG)
    )


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and stack from ptxas -v on the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas  # the ptxas Triton itself uses

    ptxas = Path(get_ptxas(arch).path)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [str(ptxas), "-v", f"-arch=sm_{arch}a", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    if done.returncode:
        sys.exit(f"{PROG}: error: ptxas failed: {done.stderr.strip().splitlines()[-1]}")
    text = done.stderr

    def num(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return dict(
        regs=num(r"Used (\d+) registers"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
        stack=num(r"(\d+) bytes stack frame"),
    )


def loop_waits(ttgir: str) -> int:
    """wgmma waits inside scf.for bodies (a wait right after each dot serialises the loop)."""
    depth, waits = 0, 0
    for line in ttgir.splitlines():
        if "scf.for" in line and line.rstrip().endswith("{"):
            depth += 1
        elif depth and line.strip().startswith("}"):
            depth -= 1
        elif depth and "warp_group_dot_wait" in line:
            waits += 1
    return waits


def report(
    cfg: tri.Config,
    *,
    paged: bool,
    split: bool,
    arch: int,
    dump: Path = None,
    tma: bool = False,
    fp8: bool = False,
) -> dict:
    k = (
        compile_hopper(cfg, arch=arch, paged=paged, split=split)
        if cfg.kernel == "hopper"
        else compile_attention(cfg, paged=paged, split=split, arch=arch, tma=tma, fp8=fp8)
    )
    ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
    if dump:
        tag = (
            f"{cfg.kernel}_{'paged' if paged else 'full'}{'_split' if split else ''}"
            f"{'_tma' if tma else ''}{'_fp8' if fp8 else ''}"
            f"_{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"
        )
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{tag}.ttgir").write_text(ttgir)
        (dump / f"{tag}.ptx").write_text(ptx)
    return dict(
        **ptxas_report(ptx, arch),
        smem=k.metadata.shared,
        async_copies=ttgir.count("async_copy_global_to_local")
        + ttgir.count("async_tma_copy_global_to_local"),
        wgmma=ptx.count("wgmma.mma_async"),
        loop_waits=loop_waits(ttgir),
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability (90: Hopper)")
    ap.add_argument("--dump", type=Path, help="write each variant's TTGIR and PTX here")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {MODES}")
    ap.add_argument(
        "--configs",
        choices=("table", "tune"),
        default="tune",
        help="table: the default tile config only; tune: every autotune candidate",
    )
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            ap.error(f"--modes: unknown mode {m!r} (known: {', '.join(MODES)})")
    configs = dict.fromkeys(
        [tri.CONFIGS[(False, 256, True)], *(tri.TUNE_CONFIGS[256] if args.configs == "tune" else [])]
    )
    print(f"Triton {triton.__version__}, sm_{args.arch}a, head dim 256, bf16")
    print(
        "| mode | tiles | warps | stages | regs | spills (st/ld B) | smem KB | async copies "
        "| wgmma | waits in loops |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for mode in modes:
        paged, split, tma, fp8 = "paged" in mode, "split" in mode, "tma" in mode, "fp8" in mode
        for cfg in [tri.HOPPER_CONFIG] if mode.startswith("hopper") else configs:
            r = report(cfg, paged=paged, split=split, arch=args.arch, dump=args.dump, tma=tma, fp8=fp8)
            print(
                f"| {mode} | {cfg.block_m}x{cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} "
                f"| {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | "
                f"{r['smem'] / 1024:.0f} | {r['async_copies']} | {r['wgmma']} | "
                f"{r['loop_waits']} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/triton_cache.sh carries Triton's compiled kernels to a fresh machine: unpacked at the
same path, a compile of the same kernel is a cache hit (nothing compiled again), and an archive
that is not there changes nothing."""

import os
import shutil
import subprocess
import sys

import pytest
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "triton_cache.sh"

# A kernel compiled for sm_90a (no GPU needed) and whether Triton compiled it or loaded it: a
# compile writes the IR text beside the binary, a carried cache holds the binary alone.
COMPILE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def scale(x, y, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y + i, 2 * tl.load(x + i, mask=i < n), mask=i < n)

src = ASTSource(fn=scale, signature={"x": "*fp32", "y": "*fp32", "n": "i32", "BLOCK": "constexpr"},
                constexprs={(3,): 128})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
print("compiled" if "ptx" in k.asm else "loaded", len(k.asm["cubin"]))
"""


def compile_scale(tmp_path, cache) -> list:
    """["compiled" | "loaded", the binary's size] (Triton reads a jit function's source file)."""
    script = tmp_path / "compile_scale.py"
    script.write_text(COMPILE)
    return run(sys.executable, str(script), cache=cache).stdout.split()


def run(*args, cache, check=True):
    # compiled, not interpreted (the tests' conftest sets TRITON_INTERPRET for the kernels)
    env = {**os.environ, "TRITON_CACHE_DIR": str(cache), "TRITON_INTERPRET": "0"}
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_carried_cache_is_hit_on_a_fresh_machine(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    cache, archive = tmp_path / "triton-cache", tmp_path / "carried.tar.xz"
    first = compile_scale(tmp_path, cache)
    assert first[0] == "compiled" and int(first[1]) > 0
    packed = run(str(SCRIPT), "pack", str(archive), cache=cache)
    assert "1 kernels in" in packed.stderr and archive.stat().st_size > 0
    shutil.rmtree(cache)  # the next machine starts bare
    run(str(SCRIPT), "unpack", str(archive), cache=cache)
    kept = sorted(p.suffix for p in cache.rglob("*") if p.is_file())
    assert set(kept) == {".cubin", ".json"}, kept
    again = compile_scale(tmp_path, cache)
    assert again == ["loaded", first[1]]  # the same binary, not compiled again


def test_no_archive_is_no_change_and_bad_use_is_one_line(tmp_path):
    cache = tmp_path / "triton-cache"
    run(str(SCRIPT), "unpack", str(tmp_path / "none.tar.xz"), cache=cache)
    assert not cache.exists()
    for args in ((), ("pack",), ("unpack-all",)):
        proc = run(str(SCRIPT), *args, cache=cache, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    proc = run(str(SCRIPT), "pack", str(tmp_path / "a.tar.xz"), cache=cache, check=False)
    assert proc.returncode == 2 and "no cache dir" in proc.stderr

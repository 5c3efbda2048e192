"""The warp-specialised Hopper kernel (hstu_exp.ops.hopper_attention) against the float32 oracle on
fresh random inputs, on an sm_90 GPU (bf16 and fp16), in full and paged mode, whole and split. Gluon
kernels have no CPU interpreter: on a machine without such a GPU these tests skip, and
tests/test_kernel_report.py still compiles the kernel for sm_90a there. Shapes cross every path of
its schedule: users shorter than a box, lengths one past a block edge, zero-length users,
candidate-only users, no candidates, a consumer half with no rows, the last key block reaching past
the user into NaN-filled dead rows; in paged mode page sizes below, at and above the 64-key block,
pages of users interleaved in the pool, users with no cache, key splits."""

import math
import random

import pytest
import torch
from test_triton_attention import paged_case

from hstu_exp.core.jagged import make_batch
from hstu_exp.ops import reference
from hstu_exp.ops import triton_attention as tri
from hstu_exp.ops.policy import KernelPolicy

pytestmark = pytest.mark.gpu
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 (Hopper) GPU")
TOL = 2e-2
NO_TUNE = KernelPolicy(autotune=False)


def case(rows, cands, H, D, *, dead=0, dtype=torch.bfloat16, seed=0, nan_dead=True):
    gen = torch.Generator().manual_seed(seed)
    batch = make_batch(rows, cands, "cuda")
    n = sum(rows) + dead
    q, k, v = ((torch.randn(n, H, D, generator=gen) * 0.5).to("cuda", dtype) for _ in range(3))
    if nan_dead:
        for t in (q, k, v):
            t[sum(rows) :] = float("nan")
    return batch, q, k, v


def oracle(batch, q, k, v, alpha, inv_n):
    """float32 reference on the live rows only (dead rows zeroed: the oracle's padded gathers may
    read them, and its answer for live rows must not depend on them)."""
    live = int(batch.offsets[-1])
    q, k, v = (
        torch.cat([t[:live].float(), torch.zeros_like(t[live:], dtype=torch.float32)]) for t in (q, k, v)
    )
    return reference.attention_full(q, k, v, batch, alpha=alpha, inv_n=inv_n)


def run(batch, q, k, v, *, out=None, config=tri.HOPPER_CONFIG, policy=NO_TUNE):
    D = q.shape[-1]
    alpha, inv_n = 1 / math.sqrt(D), 1 / 512
    att = tri.Attention(policy)
    got = att.full(q, k, v, batch, alpha=alpha, inv_n=inv_n, config=config, out=out)
    assert att.last_launch["config"].kernel == "hopper", "the Hopper kernel did not run"
    return got, oracle(batch, q, k, v, alpha, inv_n)


def check(out, ref, live):
    assert torch.isfinite(out).all(), "NaN or unwritten rows"
    o, r = out[:live].float(), ref[:live].float()
    err = ((o - r).norm() / r.norm()).item()
    assert err < TOL, err
    assert (o - r).abs().max().item() <= TOL * r.abs().max().item()
    assert (out[live:] == 0).all(), "dead rows past the last user must be zero"


@needs_hopper
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize(
    "rows,cands",
    [
        ([37], [5]),  # shorter than one query block: the second consumer half has no rows
        ([129, 0, 64, 65], [1, 0, 64, 0]),  # one past a block edge; empty, candidate-only, no cands
        ([700, 1290, 300], [256, 256, 300]),  # several query blocks, a candidate-only user
        ([4352], [256]),  # the goal shape's user (4096 history + 256 candidates)
    ],
)
def test_matches_reference(D, rows, cands):
    batch, q, k, v = case(rows, cands, H=2, D=D, dead=67, seed=D + len(rows))
    out, ref = run(batch, q, k, v)
    check(out, ref, sum(rows))


@needs_hopper
def test_fp16_and_float32_destination():
    """fp16 inputs; a float32 `out` (what a caller expecting split sums hands over) is filled in
    float32, dead rows zeroed."""
    batch, q, k, v = case([300, 77], [40, 7], H=4, D=256, dead=9, dtype=torch.float16, seed=3)
    out, ref = run(batch, q, k, v)
    check(out, ref, 377)
    dst = torch.full(q.shape, float("nan"), dtype=torch.float32, device="cuda")
    got, ref = run(batch, q, k, v, out=dst)
    assert got is dst
    check(got, ref, 377)


@needs_hopper
def test_random_jagged_batches():
    rng = random.Random(11)
    for trial in range(6):
        B = rng.randint(1, 6)
        cands = [rng.choice([0, 1, 17, 64, 200]) for _ in range(B)]
        rows = [c + rng.choice([0, 1, 63, 64, 127, 128, rng.randint(0, 2000)]) for c in cands]
        batch, q, k, v = case(
            rows,
            cands,
            H=rng.choice([1, 3, 4]),
            D=rng.choice([128, 256]),
            dead=rng.randint(0, 130),
            seed=trial,
        )
        out, ref = run(batch, q, k, v)
        check(out, ref, sum(rows))


@needs_hopper
def test_program_order_does_not_change_the_answer():
    """Programs take (user, head) pairs in groups (hopper_attention._schedule): pair by pair, in
    groups of 3 (a last group of 1 of the 10 pairs incl. the dead-row "user"), the default 8, all
    at once; each program computes the same thing, so the outputs agree bit for bit."""
    batch, q, k, v = case([300, 129, 700, 1], [44, 0, 256, 1], H=2, D=128, dead=40, seed=4)
    outs = []
    for group in (1, 3, 8, 1000):
        policy = KernelPolicy(autotune=False, hopper_group=group)
        outs.append(run(batch, q, k, v, policy=policy)[0])
    check(outs[0], run(batch, q, k, v)[1], 1130)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])


@needs_hopper
def test_default_choice_and_cuda_graph():
    """In full mode on this GPU the table's choice is the Hopper kernel; it captures into a CUDA
    graph (grid from host ints, no sync) and replays to the eager answer."""
    batch, q, k, v = case([500, 200], [64, 32], H=4, D=256, dead=20, seed=5)
    alpha, inv_n = 1 / 16, 1 / 512
    att = tri.Attention(NO_TUNE)
    fn = lambda: att.full(q, k, v, batch, alpha=alpha, inv_n=inv_n)  # noqa: E731
    expected = fn().clone()
    assert att.last_launch["config"] == tri.HOPPER_CONFIG
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    q.copy_(torch.randn_like(q) * 0.5)
    graph.replay()
    torch.cuda.synchronize()
    check(out, oracle(batch, q, k, v, alpha, inv_n), 700)
    assert not torch.equal(out, expected), "the replay did not recompute"


@needs_hopper
def test_falls_back_where_it_cannot_run():
    """Heads not packed (a TMA box cannot cover them): the portable kernel runs instead."""
    batch, q, k, v = case([90], [10], H=2, D=128, seed=8, nan_dead=False)
    q = torch.cat([q, q], dim=1)[:, ::2]  # head stride 2 D
    assert not q.is_contiguous()
    att = tri.Attention(NO_TUNE)
    out = att.full(q, k, v, batch, alpha=0.1, inv_n=0.01, config=tri.HOPPER_CONFIG)
    assert att.last_launch["config"].kernel == "triton"
    check(out, oracle(batch, q, k, v, 0.1, 0.01), 90)


def paged_oracle(batch, q, k, v, kp, vp, alpha, inv_n):
    live = int(batch.offsets[-1])
    q, k, v = (
        torch.cat([t[:live].float(), torch.zeros_like(t[live:], dtype=torch.float32)]) for t in (q, k, v)
    )
    return reference.attention_paged(q, k, v, batch, kp.float(), vp.float(), alpha=alpha, inv_n=inv_n)


@needs_hopper
@pytest.mark.parametrize("D,page_size", [(128, 16), (256, 32), (256, 64), (64, 128)])
@pytest.mark.parametrize("split_k", [None, 1, 5])
def test_paged_matches_reference(D, page_size, split_k):
    batch, q, k, v, kp, vp = paged_case(
        [1500, 97, 0, 640],
        [128, 31, 200, 0],
        [256, 0, 64, 256],
        H=4,
        D=D,
        page_size=page_size,
        dead=21,
        dtype=torch.bfloat16,
        device="cuda",
        seed=D + page_size,
    )
    live = 128 + 256 + 31 + 264 + 256
    for t in (q, k, v):
        t[live:] = float("nan")
    alpha, inv_n = 1 / math.sqrt(D), 1 / 512
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device="cuda")
    att = tri.Attention(NO_TUNE)
    got = att.paged(
        q,
        k,
        v,
        batch,
        kp,
        vp,
        alpha=alpha,
        inv_n=inv_n,
        out=out,
        split_k=split_k,
        config=tri.HOPPER_CONFIG,
    )
    assert got is out and att.last_launch["config"].kernel == "hopper"
    if split_k == 5:
        assert att.last_launch["splits"] > 1
    check(out, paged_oracle(batch, q, k, v, kp, vp, alpha, inv_n), live)


@needs_hopper
def test_paged_goal_shape_split_fp32_sums_and_graph():
    """Batch 1, 3968 cached + 128 new + 256 candidates (the B=1 cached goal case): the rule
    splits the keys; the float32 sums come back as they are (partial_fp32), and the launch
    replays from a CUDA graph to the same answer."""
    batch, q, k, v, kp, vp = paged_case(
        [3968], [128], [256], H=4, D=256, page_size=32, dtype=torch.bfloat16, device="cuda", seed=9
    )
    alpha, inv_n = 1 / 16, 1 / 4352
    att = tri.Attention(NO_TUNE)

    def fn():
        return att.paged(q, k, v, batch, kp, vp, alpha=alpha, inv_n=inv_n, partial_fp32=True)

    first = fn()
    assert att.last_launch["config"].kernel == "hopper" and att.last_launch["splits"] > 1
    assert first.dtype == torch.float32
    check(first, paged_oracle(batch, q, k, v, kp, vp, alpha, inv_n), 384)
    expected = first.clone()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)

"""FP8 (e4m3) GEMMs: the quantising LayerNorm kernels against float32 LayerNorms (Triton's
interpreter on CPU), the block with e4m3 UVQK / W_o against the float32 oracle on random shapes
(odd lengths, page boundaries, zero-length new histories, users without candidates), and the
accuracy gate that a reduced-precision point must pass to be timed."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from helpers import hstu_exp
from test_block_kernels import DEVICE, EDGE_CASES, HIDDEN, full_and_cached, reference_block

from hstu_exp.bench.measure import AccuracyGateError, Measured, finish, gate_check
from hstu_exp.bench.timer import StopRule
from hstu_exp.model.hstu import oracle
from hstu_exp.ops.fp8 import E4M3, quantize_rows
from hstu_exp.ops.fused import layernorm, layernorm_mul, layernorm_mul_torch, layernorm_torch


def assert_e4m3_of(q, scale, y):
    """q * scale represents y as e4m3 does: each element within 2^-3 of its magnitude (a
    3-bit mantissa, rounded or truncated) or within the subnormal step; scale = amax / 448."""
    assert q.dtype == E4M3 and scale.shape == (y.shape[0], 1)
    torch.testing.assert_close(
        scale, (y.abs().amax(1, keepdim=True) / 448).clamp_min(1e-12), rtol=1e-5, atol=0
    )
    back = q.float() * scale
    bound = 0.125 * y.abs() + scale * 2.0**-9 + 1e-7
    assert bool(((back - y).abs() <= bound).all()), float(((back - y).abs() - bound).max())
    assert bool((q.float().abs().amax(1) == 448)[y.abs().amax(1) > 0].all())  # full range used


@pytest.mark.parametrize("rows,width", [(1, 64), (7, 96), (33, 256)])
def test_layernorm_kernels_hand_over_e4m3_rows(rows, width):
    x = torch.randn(rows, width, device=DEVICE) * 3 + 1
    x[rows // 2] = 0.0  # a dead (all-zero) row: finite scale, zeros out
    w, b = torch.randn(width, device=DEVICE), torch.randn(width, device=DEVICE)
    q, scale = layernorm(x, w, b, 1e-5, fp8=True)
    assert_e4m3_of(q, scale, layernorm_torch(x, w, b, 1e-5))
    z = torch.randn(rows, 3 * width, device=DEVICE) * 2
    a, u = z[:, :width], z[:, width : 2 * width]  # strided views, as in the layer
    q, scale = layernorm_mul(a, u, w, b, 1e-5, fp8=True)
    assert_e4m3_of(q, scale, layernorm_mul_torch(a, u, w, b, 1e-5))
    q, scale = quantize_rows(x)  # the PyTorch path kernel=reference takes
    assert_e4m3_of(q, scale, x)


def rel(got, want):
    return ((got.float() - want).norm() / want.norm()).item()


# Triton on the CPU interpreter in fp16 (its bf16 dot is wrong); on a GPU in bf16 (row-wise
# scaled GEMMs write bf16 there).
TRITON_DTYPE = torch.float16 if DEVICE == "cpu" else torch.bfloat16


@pytest.mark.parametrize("kernel,dtype", [("reference", torch.bfloat16), ("triton", TRITON_DTYPE)])
@pytest.mark.parametrize("hist,cached,cands", EDGE_CASES + [([37, 5, 0], [0, 5, 0], [3, 2, 1])])
def test_fp8_block_against_the_float32_oracle(kernel, dtype, hist, cached, cands):
    """Full and cached: e4m3 GEMMs stay within the accuracy gate of the float32 oracle, and
    are measurably less exact than the same block with exact GEMMs (the e4m3 path ran)."""
    ref = reference_block(len(hist) + 7)
    fast = copy.deepcopy(ref).to(dtype)
    fast.kernel = kernel
    exact = copy.deepcopy(fast)
    fast.policy = replace(fast.policy, gemm_dtype="fp8")
    seqs = [torch.randn(t + c, HIDDEN, device=DEVICE) for t, c in zip(hist, cands)]
    with torch.no_grad():
        want = full_and_cached(oracle(ref), seqs, hist, cached, cands, torch.float32)
        got = full_and_cached(fast, seqs, hist, cached, cands, dtype)
        base = full_and_cached(exact, seqs, hist, cached, cands, dtype)
    for g, b, w in zip(got, base, want):
        assert g.dtype == dtype
        err, base_err = rel(g, w), rel(b, w)
        assert err < 2e-2, err
        assert err > 1.5 * base_err, (err, base_err)


def test_gate_passes_fails_and_says_why():
    ok = {"max_rel_error": 5e-3, "topk_agreement": 1.0}
    gate_check(ok, ["kernel.gemm_dtype=fp8"])
    assert ok["accuracy_gate"] == "passed"
    with pytest.raises(AccuracyGateError, match=r"max relative error 0\.03 .* > 0\.02"):
        gate_check({"max_rel_error": 0.03}, ["kernel.gemm_dtype=fp8"])
    with pytest.raises(AccuracyGateError, match=r"top-10 agreement with the bf16 path 0\.950"):
        gate_check({"max_rel_error": 1e-3, "topk_agreement": 0.95}, ["kernel.gemm_dtype=fp8"])
    with pytest.raises(AccuracyGateError, match="no verify result"):
        gate_check({"max_rel_error": None}, ["kernel.gemm_dtype=fp8"])
    # e2e's records: the gate takes the agreement within the bf16 path's own error, and a miss
    # gives the strict one and the bf16 path's own beside it
    ranked = {"max_rel_error": 1e-3, "topk_agreement": 0.9, "bf16_topk_agreement": 0.3}
    gate_check({**ranked, "topk_agreement_within_bf16_error": 1.0}, ["cache.dtype=fp8"])
    with pytest.raises(AccuracyGateError, match=r"0\.980 < 0\.99 within .* \(strict 0\.900; .* 0\.300"):
        gate_check({**ranked, "topk_agreement_within_bf16_error": 0.98}, ["cache.dtype=fp8"])


def test_topk_agreement_strict_with_ties_and_within_a_tolerance():
    """accuracy.topk_agreement on fresh random scores: strict, it is the share of the two top-k
    sets in common; an exact tie at the reference's k-th counts; a tolerance counts the ranks the
    reference cannot resolve, and a ranking that is wrong by more than the tolerance still fails."""
    from hstu_exp.bench.accuracy import near_kth_share, request_error, topk_agreement

    g = torch.Generator().manual_seed(7)
    counts = [37, 5, 0, 64]  # odd lengths, fewer than k, no candidates
    ref = torch.randn(sum(counts), generator=g)
    assert topk_agreement(ref, ref, counts, 10) == 1.0
    want = []
    for s, r in zip(ref.flip(0).split(counts), ref.split(counts)):  # an unrelated ranking
        kk = min(10, r.numel())
        if kk:
            want.append(len(set(s.topk(kk).indices.tolist()) & set(r.topk(kk).indices.tolist())) / kk)
    shuffled = ref.flip(0)
    assert topk_agreement(shuffled, ref, counts, 10) == pytest.approx(sum(want) / len(want))
    assert topk_agreement(shuffled, ref, counts, 10) < 0.8
    # the 10th and the 11th of a request tied exactly: either one is the reference's top 10
    r = torch.arange(20.0)
    r[9] = r[10]
    s = r.clone()
    s[9], s[10] = r[10] + 0.5, r[9] - 0.5  # swaps which of the tied pair is in the top 10
    assert topk_agreement(s, r, [20], 10) == 1.0
    # a small perturbation: strict misses, within the perturbation's own size it agrees
    noisy = ref + 0.05 * torch.randn(ref.shape, generator=g)
    tol = request_error(noisy, ref, counts)
    assert len(tol) == len(counts) and tol[2] == 0.0 and max(tol) < 0.3
    assert topk_agreement(noisy, ref, counts, 10, tol) == 1.0
    assert topk_agreement(shuffled, ref, counts, 10, tol) < 0.9  # a wrong ranking still fails
    share = near_kth_share(ref, counts, 10, tol)
    assert 0 < share < 0.5


def test_finish_drops_the_timing_of_a_point_that_misses_its_gate():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(
        {"verify": False, "calibrate": False, "profile": False, "kernel": {"gemm_dtype": "fp8"}}
    )
    rule = StopRule(iters=1, min_time_s=0, max_time_s=1, cv_max=10, min_samples=2)
    measured = Measured(
        samples_ms=[1.0, 1.1], flops=1.0, nbytes=1.0, rule=rule, dtype=torch.bfloat16, verify=lambda: 0.5
    )
    with pytest.raises(AccuracyGateError, match="not timed"):
        finish(measured, cfg, torch.device("cpu"))
    measured.verify = lambda: 1e-3  # verified although verify=false: the gate applies
    assert finish(measured, cfg, torch.device("cpu"))["accuracy_gate"] == "passed"


def test_cli_gates_fp8_points(tmp_path):
    """A bf16 tiny model with e4m3 GEMMs: verified and gated without verify=true; a float32
    model cannot take them (skipped, the reason names the key)."""
    proc = hstu_exp(
        "-m",
        "logger=none",
        "device=cpu",
        "model.dtype=bfloat16,float32",
        "kernel.gemm_dtype=fp8",
        "workload.total_history=40",
        "workload.new_history=40",
        "workload.num_candidates=5",
        "workload.min_time_s=0.01",
        "workload.iters=3",
        "workload.warmup=1",
        "workload.cv_max=10",
        "calibrate=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    recs = {
        r["dtype"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    }
    bf16, fp32 = recs["bfloat16"], recs["float32"]
    assert bf16["status"] == "ok" and bf16["gemm_dtype"] == "fp8"
    assert bf16["accuracy_gate"] == "passed" and 0 < bf16["max_rel_error"] < 2e-2
    assert fp32["status"] == "skipped" and "kernel.gemm_dtype=fp8" in fp32["reason"]


@pytest.mark.gpu
def test_fp8_block_replays_in_a_cuda_graph():
    """The e4m3 path captured in a CUDA graph (weights quantised before capture, activations
    by the LayerNorm kernels inside it) replays to the eager result, on fresh inputs."""
    from hstu_exp.core.jagged import make_batch
    from hstu_exp.graphs import capture

    block = reference_block(11).to(torch.bfloat16)
    block.kernel, block.policy = "triton", replace(block.policy, gemm_dtype="fp8")
    rows, cands = [37, 64, 5], [3, 0, 5]
    batch = make_batch(rows, cands, DEVICE)
    x = torch.randn(sum(rows), HIDDEN, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        graph, out = capture(lambda: block(x, batch))
        for _ in range(2):
            x.copy_(torch.randn_like(x))
            graph.replay()
            torch.testing.assert_close(out, block(x, batch), rtol=0, atol=0)

"""The one contract between a workload and its record.

A workload's `run(cfg, device, progress)` builds, prepares and times, and returns `Measured`:
only what it alone knows (its samples, the work of its timed unit, the step to profile, how to
verify, its own keys). `finish` turns that into the record's measurement part the same way for
every workload: statistics, validity, roofline, memory, clocks, profile and verify.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from hstu_exp.bench.roofline import floor, peaks
from hstu_exp.bench.timer import StopRule, cv, latency_stats
from hstu_exp.config import ACCURACY_GATE, cv_max, max_time_s, reduced_precision
from hstu_exp.env import CLOCK_KEYS
from hstu_exp.stats import bootstrap_stat, intervals_overlap

# What the FLOPs (and so TFLOP/s) count: the attention term is 4*H*D per visible (query, key)
# pair, i.e. the pairs the mask lets through, never the full square (bench/roofline.py).
FLOP_CONVENTION = "unmasked query-key pairs"


@dataclass
class Measured:
    samples_ms: List[float]  # every timed sample
    flops: float  # work of one timed unit (a sample; e2e: a batch, averaged over the stream)
    nbytes: float  # fewest bytes that unit must move
    rule: StopRule  # what timing was asked for: validity is judged against it
    dtype: torch.dtype
    clocks: dict = field(default_factory=dict)  # env.ClockSampler summary of the timed region
    step: Optional[Callable[[int], object]] = None  # profile=true: step(i), i < profile_iters
    profile_iters: int = 5
    # verify=true: max relative error vs fp32 (a float), or a dict of record keys holding it
    # ("max_rel_error") and, where the workload ranks, "topk_agreement" with the bf16 path.
    verify: Optional[Callable[[], object]] = None
    extra: dict = field(default_factory=dict)  # the workload's own record keys
    # Validity is judged on repeats of the same work: the samples themselves, or (e2e, whose
    # samples are batches of different sizes) one total per pass over the stream.
    repeats_ms: Optional[List[float]] = None
    cv_basis: str = "samples"
    # The time the roofline floor and TFLOP/s compare with; None: the median sample.
    per_unit_ms: Optional[float] = None


def stop_rule(workload, device: torch.device) -> StopRule:
    """The timing and validity settings of a point (workload config group)."""
    return StopRule(
        iters=workload.iters,
        min_time_s=workload.min_time_s,
        max_time_s=max_time_s(workload),
        cv_max=cv_max(workload, device.type),
        min_samples=workload.min_samples,
    )


# Samples are kept to 6 significant digits (1 part in a million: below the resolution of CUDA
# events and of any clock at these durations); the digits beyond are float noise, and they made
# up half of a serving record's bytes (tens of thousands of samples a point).
SAMPLE_DIGITS = 6


def finish(
    m: Measured, cfg, device: torch.device, job_dir=None, progress=print, verify: bool = True
) -> dict:
    stats = latency_stats(m.samples_ms)
    repeats = m.repeats_ms if m.repeats_ms is not None else m.samples_ms
    stats["cv"] = cv(repeats)
    problems = m.rule.problems(repeats)
    clocks = {k: None for k in CLOCK_KEYS}
    clocks.update(m.clocks)
    if clocks["throttled"]:  # a thermal or hardware slowdown; a power cap is only marked
        top = clocks.get("sm_clock_max_mhz")
        problems.append(
            f"GPU throttled ({clocks['throttle_reasons']}, SM clock "
            f"{clocks['sm_clock_mhz']}{f' of {top}' if top else ''} MHz)"
        )
    unit_ms = m.per_unit_ms if m.per_unit_ms is not None else stats["median_ms"]
    result = {
        **stats,
        "samples_ms": [float(f"{s:.{SAMPLE_DIGITS}g}") for s in m.samples_ms],
        "cv_basis": m.cv_basis,
        "valid": not problems,
        "invalid_reason": "; ".join(problems) or None,
        "headline": "median_ms",
        **clocks,
        **m.extra,
        "flops": m.flops,
        "min_bytes": m.nbytes,
        "flop_convention": FLOP_CONVENTION,
        "tflops": m.flops / unit_ms / 1e9 if unit_ms > 0 else None,
    }
    if cfg.calibrate:
        result.update(floor(m.flops, m.nbytes, peaks(device, m.dtype)))
        result["floor_fraction"] = result["floor_ms"] / unit_ms
    if device.type == "cuda":  # peaks since timing began (timer.reset_peak_memory)
        result["mem_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        result["mem_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    if cfg.profile and job_dir is not None and m.step is not None:
        from hstu_exp.bench.profile import profile_step

        progress("profiling")
        result.update(profile_step(m.step, device=device, iters=m.profile_iters, out_dir=job_dir))
    reduced = reduced_precision(cfg)
    if (cfg.verify or reduced) and verify and m.verify is not None:
        checked = m.verify()
        result.update(checked if isinstance(checked, dict) else {"max_rel_error": checked})
        if reduced:
            gate_check(result, reduced)
    return result


# What the record of a point that missed its gate keeps (no timing): its verify numbers, and what
# its KV cache held and moved (pool bytes per token, users held, bytes each way).
GATE_KEEPS = (
    "max_rel_error",
    "topk_agreement",
    "topk_agreement_within_bf16_error",
    "bf16_topk_agreement",
    "topk_near_kth_share",
    "offloaded_bytes",
    "onloaded_bytes",
)


class AccuracyGateError(RuntimeError):
    """A reduced-precision point missed its accuracy gate: recorded failed, its timing dropped;
    `record_fields` holds what its record still says (GATE_KEEPS and the kv_ fields)."""

    def __init__(self, message: str, record_fields: dict):
        super().__init__(message)
        self.record_fields = record_fields


def gate_check(result: dict, reduced: list) -> None:
    """config.ACCURACY_GATE for a point with reduced-precision keys (verified whatever verify
    says): the record keeps the gate's verdict, or the point fails with why."""
    gate = ACCURACY_GATE
    err = result.get("max_rel_error")
    # the ranking gate: top-k shared with the bf16 path, a rank the bf16 path itself cannot
    # resolve against float32 not counted as a miss (accuracy.topk_agreement's tol)
    agree = result.get("topk_agreement_within_bf16_error", result.get("topk_agreement"))
    misses = []
    if err is None or not err <= gate["max_rel_error"]:
        misses.append(
            f"max relative error {err:.3g} vs a float32 full recompute > {gate['max_rel_error']:g}"
            if err is not None
            else "no verify result"
        )
    if agree is not None and not agree >= gate["topk_agreement"]:
        base, strict = result.get("bf16_topk_agreement"), result.get("topk_agreement")
        misses.append(
            f"top-{gate['topk']} agreement with the bf16 path {agree:.3f} < {gate['topk_agreement']:g}"
            + (
                f" within the bf16 path's own error (strict {strict:.3f}; the bf16 path's own "
                f"with the float32 recompute: {base:.3f}; candidates within that error of the "
                f"{gate['topk']}th: {result.get('topk_near_kth_share', float('nan')):.3f})"
                if base is not None
                else ""
            )
        )
    if misses:
        kept = {k: v for k, v in result.items() if k in GATE_KEEPS or k.startswith("kv_")}
        raise AccuracyGateError(
            f"accuracy gate of {', '.join(reduced)} failed: {'; '.join(misses)} (not timed)", kept
        )
    result["accuracy_gate"] = "passed"


def resampling_units(m: Measured) -> List[float]:
    """What a bootstrap of this point resamples (stats.py): the pass totals where validity is
    judged on passes (e2e), else the samples."""
    return list(m.repeats_ms if m.repeats_ms is not None else m.samples_ms)


def combine_repeats(results: List[dict], units: List[List[float]]) -> dict:
    """One record of `workload.repeats` independent repeats of a point. Its body is the median
    repeat's (by the headline value: the median pass total for e2e, the median sample else),
    so statistics, roofline and clocks belong together; beside it every repeat's value, units,
    95 % interval and validity. A point is valid when every repeat is; repeats whose intervals
    do not overlap are flagged (repeats_agree=false), not averaged away."""
    key = "total_ms" if "total_ms" in results[0] else "median_ms"
    values = [r[key] for r in results]
    order = sorted(range(len(results)), key=lambda i: values[i])
    body = dict(results[order[(len(order) - 1) // 2]])
    intervals = [bootstrap_stat(u)[1:] for u in units]
    problems = [
        f"repeat {i + 1}: {r['invalid_reason']}" if len(results) > 1 else r["invalid_reason"]
        for i, r in enumerate(results)
        if not r["valid"]
    ]
    median = statistics.median(values)
    body.update(
        {
            "repeats": len(results),
            "repeat_key": key,
            "repeat_ms": values,
            "repeat_ci_ms": [list(ci) for ci in intervals],
            "repeat_valid": [r["valid"] for r in results],
            "repeat_spread": (max(values) - min(values)) / median if median > 0 else None,
            "repeats_agree": intervals_overlap(intervals),
            "valid": not problems,
            "invalid_reason": "; ".join(problems) or None,
        }
    )
    if len(results) > 1:  # one repeat: its units are samples_ms (or e2e's pass_ms) already
        body["repeat_units_ms"] = units
    return body

"""The benchmark suite's bookkeeping (configs, verdicts), on made-up measurements: nothing here times anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench_suite = pytest.importorskip("bench_suite")

PEAKS = {"fp32": 100.0, "bf16": 1.0}  # GFLOP/s


def speed_result(ref_ms: float, fast_ms: float, batch: int = 8, gflop: float = 50.0) -> dict:
    return {"reference": {"ms": ref_ms, "images_per_s": batch / ref_ms * 1e3, "flops": gflop * 1e9, "peak_mb": 100.0},
            "fast": {"ms": fast_ms, "images_per_s": batch / fast_ms * 1e3, "peak_mb": 80.0}, "batch": batch}


def test_reference_config_turns_every_speed_setting_off():
    config = bench_suite.pipeline_config(fast=False, amp=True, compile=True, quick=True)
    assert (config.attention_impl, config.cache_frozen_features, config.amp) == ("reference", False, "none")
    assert config.settings.cache_prompted_features is False and config.compile is False


def test_fast_config_uses_fused_attention_caching_and_amp_only_when_asked():
    assert bench_suite.pipeline_config(fast=True, amp=False, compile=False, quick=False).amp == "none"
    config = bench_suite.pipeline_config(fast=True, amp=True, compile=False, quick=False)
    assert (config.attention_impl, config.cache_frozen_features, config.amp) == ("fused", True, "bf16")
    assert config.settings.cache_prompted_features is True
    assert config.method == "norga" and config.settings.gate == "sigmoid"  # the quickstart preset's shape


def test_speed_row_passes_at_the_target_ratio_and_misses_below_it():
    target = bench_suite.ROWS["train_tiny"][5]
    verdict = bench_suite.verdict("train_tiny", speed_result(1000.0, 1000.0 / target), PEAKS, "fp32")
    assert verdict["result"] == "PASS" and verdict["ratio"] == pytest.approx(target) and verdict["bound"] == ""
    below = bench_suite.verdict("train_tiny", speed_result(1000.0, 1000.0 / (0.99 * target)), PEAKS, "fp32")
    assert below["result"] == "MISS" and below["bound"]


def test_a_miss_near_the_matmul_peak_says_the_peak_bounds_it():
    # 50 GFLOP in 0.6 s is 83 % of a 100 GFLOP/s peak: at most 1.2x is possible
    verdict = bench_suite.verdict("train_vitb", speed_result(600.0, 550.0), PEAKS, "fp32")
    assert verdict["result"] == "MISS"
    assert "matmul peak" in verdict["bound"] and "1.20x" in verdict["bound"]


def test_a_miss_far_from_the_peak_points_to_the_profile():
    verdict = bench_suite.verdict("infer_tiny", speed_result(5000.0, 4000.0), PEAKS, "fp32")
    assert verdict["result"] == "MISS" and "--profile infer_tiny" in verdict["bound"]


def test_flop_row_scores_the_fast_path_against_the_peak_of_its_dtype():
    result = speed_result(1000.0, 800.0, gflop=60.0)  # fast: 75 GFLOP/s
    assert bench_suite.verdict("flops_vitb", result, PEAKS, "fp32")["result"] == "PASS"
    assert bench_suite.verdict("flops_vitb", result, {"fp32": 200.0, "bf16": 1.0}, "fp32")["result"] == "MISS"


def test_pipeline_row_compares_wall_time():
    target = bench_suite.ROWS["pipeline"][5]
    for fast_seconds, result in ((90.0 / target, "PASS"), (90.0 / target * 1.01, "MISS")):
        runs = {which: {"seconds": seconds, "peak_mb": 1.0, "encoded": 10.0, "fa": 1.0}
                for which, seconds in (("reference", 90.0), ("fast", fast_seconds))}
        assert bench_suite.verdict("pipeline", runs, PEAKS, "fp32")["result"] == result


def test_the_machine_header_names_the_cpu_its_isa_and_native_bf16(tmp_path):
    from _timing import machine, machine_line

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    facts = machine(str(cpuinfo))
    assert facts["cpu"] == "AMD EPYC 9B14" and facts["isa"] == ["avx2", "avx512f", "avx512_bf16"]
    line = machine_line(facts, threads=2)
    assert "AMD EPYC 9B14" in line and "ISA avx2 avx512f avx512_bf16" in line and f"of {facts['logical_cpus']} CPUs" in line
    assert isinstance(facts["native_bf16"], bool)
    assert f"native bf16 {'yes' if facts['native_bf16'] else 'no'}" in line  # norga's own check of this machine
    bare = tmp_path / "bare"
    bare.write_text("model name\t: Old CPU\nflags\t\t: fpu sse\n")
    assert "ISA none of avx2" in machine_line(machine(str(bare)), threads=1)

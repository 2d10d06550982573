"""The benchmark suite's bookkeeping (configs, verdicts), on made-up measurements: nothing here times anything."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

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


def test_a_speed_row_passes_at_the_target_fraction_of_the_peak_of_its_dtype_and_misses_below_it():
    target = bench_suite.ROWS["train_tiny"][5]
    # 50 GFLOP a step at the target fraction of a 1 GFLOP/s bf16 peak takes 50 / target seconds
    at_target = speed_result(1e6, 50e3 / target)
    verdict = bench_suite.verdict("train_tiny", at_target, PEAKS, "bf16")
    assert verdict["result"] == "PASS" and verdict["fast_fraction"] == pytest.approx(target) and verdict["bound"] == ""
    assert verdict["reference_fraction"] == pytest.approx(50 / 1e3 / PEAKS["fp32"])  # the reference: fp32 peak
    assert verdict["ratio"] == pytest.approx(1e6 / (50e3 / target))  # a column, not the target
    below = bench_suite.verdict("train_tiny", speed_result(1e6, 50e3 / (0.99 * target)), PEAKS, "bf16")
    assert below["result"] == "MISS" and "--profile train_tiny" in below["bound"]


def test_the_same_step_time_scores_against_the_peak_of_the_dtype_in_use():
    result = speed_result(1000.0, 600.0)  # 50 GFLOP in 0.6 s: 83 GFLOP/s
    assert bench_suite.verdict("infer_vitb", result, PEAKS, "fp32")["result"] == "PASS"  # 83 % of 100
    missed = bench_suite.verdict("infer_vitb", result, {"fp32": 100.0, "bf16": 200.0}, "bf16")  # 42 % of 200
    assert missed["result"] == "MISS" and missed["fast_fraction"] == pytest.approx(50 / 0.6 / 200)
    assert "against 250 ms at the bf16 peak" in missed["bound"]  # 50 GFLOP at 200 GFLOP/s


def test_pipeline_row_scores_its_own_counted_work_per_second():
    target = bench_suite.ROWS["pipeline"][5]
    for fast_seconds, result in ((100.0 / target, "PASS"), (100.0 / target * 1.01, "MISS")):
        runs = {"reference": {"seconds": 90.0, "peak_mb": 1.0, "encoded": 10.0, "fa": 1.0, "flops": 5e12},
                "fast": {"seconds": fast_seconds, "peak_mb": 1.0, "encoded": 5.0, "fa": 1.0, "flops": 1e13}}
        verdict = bench_suite.verdict("pipeline", runs, PEAKS, "fp32")  # 10 TFLOP at a 100 GFLOP/s peak: 100 s
        assert verdict["result"] == result and verdict["ratio"] == pytest.approx(90.0 / fast_seconds)


def test_peaks_take_the_best_size_and_keep_emulated_bf16_small(monkeypatch):
    calls = []

    def fake_gflops(dtype, size):  # a made-up machine whose best size is 1024
        calls.append((dtype, size))
        return {512: 10.0, 1024: 30.0, 2048: 20.0, 256: 5.0}[size]

    monkeypatch.setattr(bench_suite, "matmul_gflops", fake_gflops)
    native = bench_suite.peaks(native_bf16=True)
    assert native["fp32"] == native["bf16"] == 30.0 and native["best_size"] == {"fp32": 1024, "bf16": 1024}
    calls.clear()
    emulated = bench_suite.peaks(native_bf16=False)
    assert emulated["bf16"] == 10.0 and max(size for dtype, size in calls if dtype is torch.bfloat16) == 512


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


@pytest.mark.parametrize("row", ["inflora_vitb", "sdlora_vitb"])
def test_a_lora_row_scores_the_ratio_of_its_step_to_the_frozen_forward_backward(row):
    target = bench_suite.ROWS[row][5]
    at_target = bench_suite.verdict(row, speed_result(100.0, 100.0 * target), PEAKS, "bf16")
    assert at_target["result"] == "PASS" and at_target["ratio"] == pytest.approx(target)
    assert at_target["reference_fraction"] == pytest.approx(50 / 0.1 / PEAKS["bf16"])  # the reference: same dtype
    over = bench_suite.verdict(row, speed_result(100.0, 100.0 * target * 1.01), PEAKS, "bf16")
    assert over["result"] == "MISS" and f"--profile {row}" in over["bound"]


@pytest.mark.parametrize("method", [None, "inflora", "sdlora"])
def test_the_lora_rows_steps_change_only_what_they_train(method):
    step, batch = bench_suite.lora_step(method, "vit_tiny_32", batch=2)
    frozen = step.__closure__  # the step's own objects: the host and (for a method) its bank
    cells = {type(cell.cell_contents).__name__: cell.cell_contents for cell in frozen}
    host, optimizer = cells["PromptedViT"], cells["Adam"]
    before = {name: p.detach().clone() for name, p in host.named_parameters()}
    step()
    changed = {name for name, p in host.named_parameters() if not torch.equal(p, before[name])}
    assert changed == {"backbone.head.weight", "backbone.head.bias"} and batch == 2
    trained = {None: 0, "inflora": 1, "sdlora": 2 + bench_suite.LORA_TASK + 1}[method]  # B; or A, B, m_0..m_t
    assert len(optimizer.param_groups[0]["params"]) == 2 + trained


def test_a_row_is_scored_against_the_peak_measured_beside_its_steps():
    result = speed_result(1000.0, 600.0)  # 50 GFLOP in 0.6 s: 83 GFLOP/s, 83 % of the start's 100 GFLOP/s fp32
    assert bench_suite.verdict("infer_vitb", result, PEAKS, "fp32")["result"] == "PASS"
    result["peaks_beside"] = {"fp32": 125.0}  # the machine ran faster beside this row's steps: 67 %
    verdict = bench_suite.verdict("infer_vitb", result, PEAKS, "fp32")
    assert verdict["result"] == "MISS" and verdict["fast_fraction"] == pytest.approx(50 / 0.6 / 125)
    assert verdict["peak_gflops"] == 125.0 and "against 400 ms at the fp32 peak" in verdict["bound"]
    assert verdict["reference_fraction"] == pytest.approx(50 / 1.0 / 125)  # the reference's fp32 peak too


def test_peak_probes_record_the_rate_of_each_dtype_at_its_size(monkeypatch):
    calls = []

    def fake_gflops(dtype, size, min_seconds):
        calls.append((dtype, size))
        return float(len(calls))

    monkeypatch.setattr(bench_suite, "matmul_gflops", fake_gflops)
    probes, rates = bench_suite.peak_probes({"fp32": 1024, "bf16": 512})
    for _ in range(2):
        for probe in probes.values():
            probe()
    assert calls == [(torch.float32, 1024), (torch.bfloat16, 512)] * 2 and rates == {"fp32": [1.0, 3.0], "bf16": [2.0, 4.0]}


def test_the_ranpac_row_is_reported_with_its_parts_and_no_target():
    parts = {"reference": (2.0, 30.0, 8.0), "fast": (4.0, 6.0, 2.0)}
    result = {which: {"statistics": a, "lambda_search": b, "solve": c, "seconds": a + b + c, "peak_mb": 10.0}
              for which, (a, b, c) in parts.items()}
    verdict = bench_suite.verdict("ranpac", result, PEAKS, "bf16")
    assert verdict["result"] == "-" and verdict["target"] == "reported" and verdict["ratio"] == pytest.approx(40 / 12)
    assert verdict["fast_fraction"] is None and "reference 2.0 / 30.0 / 8.0 s, fast 4.0 / 6.0 / 2.0 s" in verdict["bound"]


def test_the_ranpac_row_times_the_official_float32_numerics_against_norgas_float64():
    official = bench_suite.ranpac_head(official=True, samples=60, dim=48)
    norga = bench_suite.ranpac_head(official=False, samples=60, dim=48)
    assert (official["statistics_dtype"], norga["statistics_dtype"]) == ("float32", "float64")
    for run in (official, norga):
        parts = run["statistics"] + run["lambda_search"] + run["solve"]
        assert run["seconds"] == pytest.approx(parts) and run["seconds"] > 0


def test_the_smope_rows_reference_and_fast_paths_compute_the_same_logits():
    torch.manual_seed(0)  # the same seed for both builds: the same weights and images (the experts seed themselves)
    reference, batch = bench_suite.smope_step("reference", "vit_tiny_32", batch=3)
    torch.manual_seed(0)
    fast, _ = bench_suite.smope_step("fused", "vit_tiny_32", batch=3)
    expected = reference()
    assert batch == 3 and expected.shape == (3, 100)
    for step, impl in ((reference, "reference"), (fast, "fused")):  # each path runs its own attention kernels
        host = {type(cell.cell_contents).__name__: cell.cell_contents for cell in step.__closure__}["PromptedViT"]
        assert {block.attn.impl for block in host.backbone.blocks[:6]} == {impl}
    # fp32 attention reordered: a few roundings of the logits' scale
    torch.testing.assert_close(fast(), expected, rtol=0, atol=64 * torch.finfo(torch.float32).eps * expected.abs().max())

"""The planner's step-time model on this host: calibration (fast) and the rank correlation of
predicted vs measured step times over layouts of the debug model (slow, bench/planner_step_time.py)."""

import math
import statistics
import sys
from pathlib import Path

import pytest

from torchtitan.planner.calibrate import Probe, fit, measure, predict_collective, save_calibration
from torchtitan.planner.hardware import load_hardware

REPO = Path(__file__).resolve().parents[2]


def test_calibrate_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    m = measure(2, seconds=12, probe=Probe(local_bs=1, seq_len=128))
    hw = fit(m)
    assert hw.name == "cpu-2proc" and hw.compute_bytes == 4 and hw.fp8_tflops == 0
    assert hw.peak_tflops > 0 and hw.half_size >= 0 and hw.matmul_efficiency == 1.0
    assert hw.latency_s > 0 and hw.intra_gbps > 0 and hw.inter_gbps == hw.intra_gbps
    assert hw.hbm_gbps > 0 and hw.memory_gib > 0 and hw.elementwise_overhead >= 0
    assert all(math.isfinite(v) for v in (hw.peak_tflops, hw.latency_s, hw.intra_gbps, hw.hbm_gbps))
    assert "2 processes at once" in hw.notes
    # The fitted latency + bytes / bandwidth reproduces what was measured: over every point, and an
    # all-reduce of 4 MiB (a DDP bucket) by itself, within a factor 2.
    ratios = [predict_collective(hw, op, b, 2) / t for op, sizes in m.collective_s.items() for b, t in sizes.items()]
    geomean = math.exp(statistics.fmean(math.log(r) for r in ratios))
    assert 0.5 <= geomean <= 2, (geomean, ratios)
    measured = m.collective_s["all_reduce"][4 << 20]
    assert 0.5 <= predict_collective(hw, "all_reduce", 4 << 20, 2) / measured <= 2, (measured, hw)
    path = tmp_path / "calib.json"
    save_calibration(hw, str(path))
    assert load_hardware(str(path)) == hw


@pytest.mark.slow
def test_step_time_rank_correlation():
    sys.path.insert(0, str(REPO / "bench"))
    from planner_step_time import calibrate_quietly, run_benchmark

    # Sharding, replication, tensor and pipeline parallelism, recomputation and accumulation: 7 layouts
    # whose measured step times differ by up to 2x; 2 interleaved runs each (~6 minutes in all).
    layouts = ["fsdp4", "ddp4", "tp2_fsdp2", "tp4", "fsdp4_ac_full", "fsdp4_local1_accum2", "pp4_gpipe_4mb"]
    result = run_benchmark(layouts, calibrate_quietly(), steps=7, rounds=2, log=lambda line: None)
    table = "\n".join(f"{r['layout']}: measured {r['measured']:.3f} s (other load {r['load']:.2f} cores), "
                      f"predicted {r['predicted']:.3f} s" for r in result["rows"])
    assert result["spearman"] >= 0.8, f"Spearman {result['spearman']:.3f}\n{table}"

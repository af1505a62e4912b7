"""torch.profiler traces every profile_freq steps, one file per rank; memory snapshots are CUDA-only."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import run, tiny_args, tiny_overrides, torchrun
from torchtitan.config.job_config import Profiling
from torchtitan.tools.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling, profile_schedule


@pytest.mark.parametrize("freq,expected", [(10, (8, 1, 1)), (2, (0, 1, 1)), (1, (0, 0, 1))])
def test_schedule_records_the_last_step_of_every_period(freq, expected):
    assert profile_schedule(freq) == expected


def test_bad_profile_freq_is_a_clear_error():
    with pytest.raises(ValueError, match="profile_freq"):
        profile_schedule(0)


def _trace_events(path: Path) -> list:
    events = json.loads(path.read_text())["traceEvents"]
    assert events, path
    return events


def test_in_process_schedule_and_resume_offset(tmp_path):
    """Traces land on multiples of profile_freq, counted from the resumed step."""
    cfg = Profiling(enable_profiling=True, profile_freq=3)
    with maybe_enable_profiling(cfg, str(tmp_path), global_step=3) as prof:
        for _ in range(6):  # steps 4..9
            torch.randn(32, 32) @ torch.randn(32, 32)
            prof.step()
    traces = tmp_path / "profile_traces"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_6", "iteration_9"]
    for step in (6, 9):  # the folder, and the profiler's step label inside, are the training step
        names = {e.get("name") for e in _trace_events(traces / f"iteration_{step}" / "rank0_trace.json")}
        assert "aten::mm" in names
        assert {n for n in names if str(n).startswith("ProfilerStep#")} == {f"ProfilerStep#{step}"}


def test_every_step_from_the_first_with_profile_freq_1(tmp_path):
    with maybe_enable_profiling(Profiling(enable_profiling=True, profile_freq=1), str(tmp_path)) as prof:
        for _ in range(2):  # steps 1, 2
            torch.randn(8, 8) @ torch.randn(8, 8)
            prof.step()
    traces = tmp_path / "profile_traces"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_1", "iteration_2"]
    names = {e.get("name") for e in _trace_events(traces / "iteration_1" / "rank0_trace.json")}
    assert "ProfilerStep#1" in names


def test_disabled_profiling_and_cpu_memory_snapshot_are_no_ops(tmp_path):
    off = Profiling(enable_profiling=False, enable_memory_snapshot=True)
    with maybe_enable_profiling(off, str(tmp_path), 0) as prof, \
            maybe_enable_memory_snapshot(off, str(tmp_path), 0, torch.device("cpu")) as mem:
        prof.step()
        mem.step()
        mem.dump_on_oom()
    assert list(tmp_path.iterdir()) == []


def test_two_rank_run_writes_a_trace_per_rank_per_period(tmp_path, cache_dir):
    args = [*tiny_overrides(tmp_path, cache_dir, 4), "--model.n_layers", "2",
            "--profiling.enable_profiling", "--profiling.profile_freq", "2",
            "--profiling.enable_memory_snapshot"]
    proc = torchrun(2, args)
    traces = tmp_path / "profile_traces"
    assert sorted(p.name for p in traces.iterdir()) == ["iteration_2", "iteration_4"]
    for it in ("iteration_2", "iteration_4"):
        assert sorted(p.name for p in (traces / it).iterdir()) == ["rank0_trace.json", "rank1_trace.json"]
        for rank in (0, 1):
            _trace_events(traces / it / f"rank{rank}_trace.json")
    log = proc.stdout + proc.stderr
    assert "profiling.enable_memory_snapshot is ignored" in log
    assert not (tmp_path / "memory_snapshot").exists()


def test_a_profiled_single_process_run_prints_no_noise(tmp_path, cache_dir):
    """No kineto USDT lines, no profiler warnings, no collective timeout without collectives."""
    proc = run(tiny_args(tmp_path, cache_dir, 3, "--profiling.enable_profiling", "--profiling.profile_freq", "3"))
    log = proc.stdout + proc.stderr
    for noise in ("USDT", "Warning", "collective timeout"):
        assert noise not in log, log[-3000:]
    assert "profiler trace of step 3 written to" in log
    names = {e.get("name") for e in _trace_events(tmp_path / "profile_traces" / "iteration_3" / "rank0_trace.json")}
    assert "ProfilerStep#3" in names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_snapshot_every_period_and_on_oom(tmp_path):
    cfg = Profiling(enable_memory_snapshot=True, profile_freq=2)
    with maybe_enable_memory_snapshot(cfg, str(tmp_path), 0, torch.device("cuda")) as mem:
        for _ in range(2):
            torch.randn(256, 256, device="cuda").sum()
            mem.step()
        mem.dump_on_oom()
    folder = tmp_path / "memory_snapshot"
    assert sorted(p.name for p in folder.iterdir()) == ["iteration_2", "iteration_3_exit"]
    assert (folder / "iteration_2" / "rank0_memory_snapshot.pickle").stat().st_size > 0

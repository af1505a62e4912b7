"""Memory estimation: fake-tensor estimate vs the measured peak of a real 2-rank FSDP run.

Measured = peak live tensor bytes on rank 0 over 2 train steps, from torch.profiler allocation
events (CPU) -- see torchtitan/tools/memory_estimation.py and BENCHMARKS.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, _free_port

SCRIPT = str(REPO / "scripts" / "estimate_memory.py")
TOLERANCE = 0.15


def _base(dump: Path, cache: Path, flavor: str) -> list[str]:
    return [
        "--config", str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--tokenizer.cache_dir", str(cache),
        "--model.flavor", flavor,
        "--comm.init_timeout_seconds", "120",
        "--comm.train_timeout_seconds", "120",
    ]


def _estimate(args: list[str], ngpu: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, SCRIPT, "--ngpu", str(ngpu), "--json-out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "params" in proc.stdout and "total" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def _torchrun_measure(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend",
           "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", SCRIPT, "--measure", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]


def _check_against_real_run(tmp_path: Path, cache: Path, flavor: str) -> None:
    args = _base(tmp_path, cache, flavor)
    est = _estimate(args, 2, tmp_path / "estimate.json")
    assert est["method"] == "FSDPMemTracker", est
    measured_json = tmp_path / "measured.json"
    _torchrun_measure(2, ["--compare-to", str(tmp_path / "estimate.json"), "--json-out", str(measured_json), *args])
    measured = json.loads(measured_json.read_text())["rank0"]
    rel = abs(est["total"] - measured) / measured
    print(f"{flavor}: estimate {est['total'] / 2**30:.4f} GiB vs measured {measured / 2**30:.4f} GiB ({rel:.1%})")
    assert rel <= TOLERANCE, (est, measured)


def test_debug_model_fsdp_ws2_within_15_percent(tmp_path, cache_dir):
    _check_against_real_run(tmp_path, cache_dir, "debugmodel")


@pytest.mark.slow
def test_125m_fsdp_ws2_within_15_percent(tmp_path, cache_dir):
    _check_against_real_run(tmp_path, cache_dir, "125M")


def test_train_py_hook_estimates_tp_layout_analytically(tmp_path, cache_dir):
    """memory_estimation.enable makes train.py estimate (no training); TP takes the analytic path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WORLD_SIZE="4", RANK="0")
    args = [*_base(tmp_path, cache_dir, "debugmodel"), "--memory_estimation.enable", "--parallelism.tp", "2"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "method: analytic, world size 4" in proc.stdout, proc.stdout
    assert "dp_shard=2" in proc.stdout and "tp=2" in proc.stdout, proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists()  # it did not train

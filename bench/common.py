"""What the benchmarks share: one train.py run read back from its metrics, and the measured
matmul peak of this device."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the benchmarks read a few constants of the framework itself


def measured_matmul_flops(n: int = 2048, dtype=torch.float32, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on this device: the practical peak (the only one on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return _best_flops(lambda: a @ b, 2 * n**3, device, repeats)


def measured_float8_flops(n: int = 8192, repeats: int = 10) -> float:
    """Best FLOP/s of torch._scaled_mm (e4m3 x e4m3 -> bf16, tensorwise scales) on this GPU."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm needs
    one = torch.ones((), device="cuda")
    return _best_flops(lambda: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16), 2 * n**3, "cuda", repeats)


def _best_flops(fn, flops: float, device: str, repeats: int) -> float:
    fn()  # warm-up: kernel selection, allocator
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return flops / best


def run_train(overrides: list[str], steps: int, log_freq: int, env: dict | None = None,
              nproc: int = 1, timeout: float | None = None) -> dict:
    """Run train.py (the debug config plus ``overrides``) in a fresh process; return the last
    metrics record (the steady-state window) or {"error": last lines} if it failed."""
    with tempfile.TemporaryDirectory() as dump:
        launcher = [sys.executable] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
        cmd = [
            *launcher, str(REPO / "train.py"),
            "--job.config_file", str(REPO / "train_configs/debug_model.toml"), "--job.dump_folder", dump,
            "--training.steps", str(steps), "--metrics.log_freq", str(log_freq), *overrides,
        ]
        full_env = dict(os.environ, **(env or {}))
        full_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        metrics = Path(dump, "metrics.jsonl")
        if proc.returncode or not metrics.exists():
            tail = [x for x in proc.stderr.splitlines() if x.strip()][-3:]
            return {"error": " | ".join(tail)[-400:]}
        return json.loads(metrics.read_text().splitlines()[-1])

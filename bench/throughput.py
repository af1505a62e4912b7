"""Tokens/s and MFU of the training step on this machine, for the debug and the ~125M model.

    python bench/throughput.py [--steps 12] [--models debugmodel,125M] [--compile]

Each case runs train.py in a fresh process and reads the steady-state window (the
last log window, after warm-up) from its metrics.jsonl. MFU uses the datasheet bf16
peak on known GPUs; on CPU it uses the measured fp32 matmul peak of this machine
(printed), since CPUs have no datasheet figure to compare with.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

CASES = {  # model -> (seq_len, global batch)
    "debugmodel": (512, 8),
    "125M": (512, 4),
}


def measured_matmul_flops(n: int = 2048, dtype=torch.float32, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul on this device: the practical peak for MFU on CPU."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def run_case(model: str, steps: int, extra: list[str], peak: float | None) -> dict:
    seq_len, batch = CASES[model]
    log_freq = max(1, steps // 2)
    with tempfile.TemporaryDirectory() as dump:
        cmd = [
            sys.executable, str(REPO / "train.py"),
            "--job.config_file", str(REPO / "train_configs/debug_model.toml"),
            "--job.dump_folder", dump, "--model.flavor", model,
            "--training.steps", str(steps), "--training.seq_len", str(seq_len),
            "--training.global_batch_size", str(batch), "--metrics.log_freq", str(log_freq),
            *(["--metrics.peak_flops", str(peak)] if peak else []), *extra,
        ]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise SystemExit(f"{model} failed:\n{proc.stderr[-3000:]}")
        records = [json.loads(x) for x in Path(dump, "metrics.jsonl").read_text().splitlines()]
    return records[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--models", default="debugmodel,125M")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    on_cuda = torch.cuda.is_available()
    peak = None if on_cuda else measured_matmul_flops()
    device = torch.cuda.get_device_name() if on_cuda else f"CPU x{os.cpu_count()}"
    if peak:
        print(f"measured fp32 matmul peak on this CPU: {peak / 1e9:.1f} GFLOP/s (used for MFU)")
    extra = ["--compile.enable"] if args.compile else []
    rows = []
    for model in args.models.split(","):
        r = run_case(model, args.steps, extra, peak)
        rows.append((model, *CASES[model], r["tps"], r["mfu"], r["memory_gib"], r["step_time_s"]))
    print(f"\ndevice: {device}   torch {torch.__version__}   compile: {args.compile}")
    print(f"{'model':<12}{'seq':>6}{'batch':>7}{'tok/s':>11}{'MFU %':>8}{'mem GiB':>9}{'s/step':>9}")
    for model, seq, batch, tps, mfu, mem, st in rows:
        mfu_s = f"{mfu:.1f}" if mfu is not None else "n/a"
        print(f"{model:<12}{seq:>6}{batch:>7}{tps:>11,.0f}{mfu_s:>8}{mem:>9.2f}{st:>9.2f}")


if __name__ == "__main__":
    main()

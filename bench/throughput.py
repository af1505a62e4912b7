"""Tokens/s and MFU of the training step on this machine, for the debug and the ~125M model.

    python bench/throughput.py [--steps 12] [--models debugmodel,125M] [--compile]

Each case runs train.py in a fresh process and reads the steady-state window (the
last log window, after warm-up) from its metrics.jsonl. MFU uses the datasheet bf16
peak on known GPUs; on CPU it uses the measured fp32 matmul peak of this machine
(printed), since CPUs have no datasheet figure to compare with.
"""

import argparse
import os

import torch

from common import measured_matmul_flops, run_train

CASES = {  # model -> (seq_len, global batch)
    "debugmodel": (512, 8),
    "125M": (512, 4),
}


def run_case(model: str, steps: int, extra: list[str], peak: float | None) -> dict:
    seq_len, batch = CASES[model]
    overrides = [
        "--model.flavor", model, "--training.seq_len", str(seq_len), "--training.global_batch_size", str(batch),
        *(["--metrics.peak_flops", str(peak)] if peak else []), *extra,
    ]
    record = run_train(overrides, steps, log_freq=max(1, steps // 2))
    if "error" in record:
        raise SystemExit(f"{model} failed: {record['error']}")
    return record


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

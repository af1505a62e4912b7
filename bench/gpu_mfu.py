"""Tokens/s, MFU and peak memory of Llama 3.2 1B- and 3B-shaped models on one GPU.

    python bench/gpu_mfu.py                          # the default grid (~14 runs)
    python bench/gpu_mfu.py --grid full              # every combination (48 runs)
    python bench/gpu_mfu.py --only 3B-8192           # the rows whose name contains a string
    python bench/gpu_mfu.py --steps 20 --vocab 128256

Each row is a fresh ``train.py`` process (one GPU, no FSDP: bf16 autocast), with the
published flavor shape and a 128256-row vocabulary (``model.vocab_size``: the embedded
tokenizer is small, the Llama 3 output layer is not). The last log window (after compile and
warm-up) gives tokens/s, MFU and the peak memory of the step.

MFU = flops per token x tokens/s / peak, flops per token = 6 x non-embedding params
+ 12 x layers x heads x head_dim x seq_len (torchtitan's and PaLM's formula, causal mask
ignored). Two peaks are printed: the dense bf16 datasheet figure (what "MFU" means in
papers and in torchtitan's tables) and the best bf16 matmul this GPU measured here; float8
rows are still divided by the bf16 peak, so their MFU is comparable with the bf16 rows'.
Rows that run out of memory say so instead of stopping the table.
"""

import argparse
import itertools
import sys

import torch

from common import measured_float8_flops, measured_matmul_flops, run_train
from torchtitan.components.metrics import peak_flops
from torchtitan.config.job_config import Metrics as MetricsConfig

BATCH = {2048: 4, 8192: 1}  # sequences per step: 8K tokens at 2048, 8K at 8192


def grid(kind: str) -> list[dict]:
    full = [
        dict(flavor=f, seq=s, precision=p, compile=c, ac=a)
        for f, s, p, c, a in itertools.product(("1B", "3B"), (2048, 8192), ("bf16", "float8"), (True, False),
                                               ("none", "selective", "full"))
    ]
    if kind == "full":
        return full

    def keep(r: dict) -> bool:
        if r["compile"] and r["ac"] == "selective":  # the recommended setting, both precisions
            return True
        if r["precision"] == "bf16" and r["ac"] == "selective":  # what compile buys
            return True
        return r["flavor"] == "3B" and r["seq"] == 8192 and r["precision"] == "bf16" and r["compile"]  # AC modes

    return [r for r in full if keep(r)]


def name(r: dict) -> str:
    return f"{r['flavor']}-{r['seq']}-{r['precision']}-{'compile' if r['compile'] else 'eager'}-ac_{r['ac']}"


def overrides(r: dict, vocab: int) -> list[str]:
    args = [
        "--model.flavor", r["flavor"], "--model.vocab_size", str(vocab),
        "--training.seq_len", str(r["seq"]), "--training.global_batch_size", str(BATCH[r["seq"]]),
        "--activation_checkpoint.mode", r["ac"], "--activation_checkpoint.selective_ac_option", "op",
        "--lr_scheduler.warmup_steps", "2", "--data.shuffle_windows", "0",
    ]
    if r["compile"]:
        args.append("--compile.enable")
    if r["precision"] == "float8":
        args += ["--float8.enable_float8_linear", "--float8.recipe_name", "tensorwise"]
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("default", "full"), default="default")
    parser.add_argument("--only", default="", help="comma-separated substrings of row names to keep")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per row")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_mfu.py needs a CUDA GPU; on CPU use bench/throughput.py")
    rows = grid(args.grid)
    if args.only:
        rows = [r for r in rows if any(s in name(r) for s in args.only.split(","))]
    device = torch.cuda.get_device_name()
    datasheet = peak_flops(MetricsConfig(), torch.device("cuda")) or float("nan")
    bf16_peak = measured_matmul_flops(8192, torch.bfloat16, repeats=10)
    fp8_peak = measured_float8_flops() if torch.cuda.get_device_capability() >= (8, 9) else None
    print(f"{device}, torch {torch.__version__}; measured matmul peak: bf16 {bf16_peak / 1e12:.0f} TFLOP/s"
          + (f", float8 {fp8_peak / 1e12:.0f} TFLOP/s" if fp8_peak else ""), flush=True)
    results = []
    for r in rows:
        record = run_train(overrides(r, args.vocab), args.steps, log_freq=5, timeout=args.timeout)
        results.append((r, record))
        status = record.get("error") or f"{record['tps']:,.0f} tok/s, MFU {record['mfu']:.1f}%"
        print(f"  {name(r)}: {status}", flush=True)

    print(f"\n{device}   torch {torch.__version__}   steps {args.steps} (last 5 timed)   vocab {args.vocab}")
    print(f"MFU: vs the datasheet bf16 peak {datasheet / 1e12:.0f} TFLOP/s; MFU* = vs the measured bf16 matmul "
          f"{bf16_peak / 1e12:.0f} TFLOP/s")
    print(f"{'flavor':<7}{'seq':>6}{'batch':>6}  {'prec':<7}{'compile':<8}{'AC':<10}{'tok/s':>9}{'MFU %':>7}"
          f"{'MFU* %':>8}{'mem GiB':>9}")
    for r, rec in results:
        head = f"{r['flavor']:<7}{r['seq']:>6}{BATCH[r['seq']]:>6}  {r['precision']:<7}{str(r['compile']):<8}{r['ac']:<10}"
        if "error" in rec:
            oom = "out of memory" in rec["error"].lower() or "OutOfMemory" in rec["error"]
            print(head + ("OOM" if oom else "failed: " + rec["error"][:60]).rjust(9))
            continue
        mfu = rec["mfu"] or 0.0  # null on a GPU missing from the datasheet table
        print(head + f"{rec['tps']:>9,.0f}{mfu:>7.1f}{mfu * datasheet / bf16_peak:>8.1f}{rec['memory_gib']:>9.1f}")


if __name__ == "__main__":
    main()

"""Validation overhead: the time of one evaluation next to the training steps around it.

    python bench/validation.py [--model debugmodel] [--steps 16] [--val-steps 4] [--freq 100] [--nproc 1]

Two runs of train.py (fresh processes; the debug config at seq_len 256, global batch 8, local batch 8):
1. validation after every step on ``--val-steps`` batches: each step gives a pair (training step time,
   evaluation time) measured back to back in one process, so their ratio holds on a machine whose
   speed drifts (ours is shared); the median over the steps after warm-up is reported;
2. the same with the whole held-out stdlib split (``validation.steps = -1``), over 6 steps.
From metrics.jsonl: ``step_time_s`` (the training step; validation is left out of it), ``val_seconds``
(one evaluation: loader reset, tokenization, forwards, all-reduce) and ``val_tokens``. "Batch cost"
is one validation batch (as many tokens as one training step) in training steps; the overhead is
what one such evaluation every ``--freq`` steps adds to training time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3


def run(args, steps: int, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as dump:
        launcher = [sys.executable] if args.nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
        cmd = [
            *launcher, str(REPO / "train.py"), "--job.config_file", str(REPO / "train_configs/debug_model.toml"),
            "--job.dump_folder", dump, "--model.flavor", args.model, "--training.steps", str(steps),
            "--metrics.log_freq", "1", "--training.seq_len", "256", "--training.global_batch_size", "8",
            "--validation.enable", *extra,
        ]
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return [json.loads(x) for x in Path(dump, "metrics.jsonl").read_text().splitlines()]


def summarize(records: list[dict], batches: int) -> dict:
    pairs = [r for r in records if "val_seconds" in r][WARMUP:] or [r for r in records if "val_seconds" in r]
    step_s = statistics.median(r["step_time_s"] for r in records[WARMUP:])
    val_s = statistics.median(r["val_seconds"] for r in pairs)
    cost = statistics.median(r["val_seconds"] / batches / r["step_time_s"] for r in pairs)
    return {"step_s": step_s, "val_s": val_s, "val_tokens": pairs[0]["val_tokens"], "batches": batches,
            "batch_cost": cost, "first_val_s": [r for r in records if "val_seconds" in r][0]["val_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="debugmodel")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--val-steps", type=int, default=4)
    p.add_argument("--freq", type=int, default=100, help="validation.freq the overhead column assumes")
    p.add_argument("--nproc", type=int, default=1)
    args = p.parse_args()
    paired = run(args, args.steps, ["--validation.freq", "1", "--validation.steps", str(args.val_steps)])
    whole = run(args, WARMUP + 3, ["--validation.freq", "1", "--validation.steps", "-1"])
    whole_batches = whole[-1]["val_tokens"] // (8 * 256)
    results = {f"{args.val_steps} batches, after every step": summarize(paired, args.val_steps),
               "whole held-out split, after every step": summarize(whole, whole_batches)}
    print(f"{args.model}, seq_len 256, global batch 8, {args.steps} steps, nproc {args.nproc}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'auto')}")
    print(f"| validation | train s/step | s per evaluation (first) | tokens per evaluation | batch cost (steps) "
          f"| overhead, every {args.freq} steps |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        overhead = 100 * r["batch_cost"] * r["batches"] / args.freq
        print(f"| {name} | {r['step_s']:.3f} | {r['val_s']:.2f} ({r['first_val_s']:.2f}) | {r['val_tokens']:,} | "
              f"{r['batch_cost']:.2f} | {overhead:.1f}% |")


if __name__ == "__main__":
    main()

"""Step time with a checkpoint every N steps: no checkpoint vs sync vs each async mode.

    python bench/checkpoint_overhead.py [--model debugmodel] [--steps 20] [--every 5] [--warmup 3]

Each case trains in a fresh process (this file re-run with --child; DCP's checkpoint process
re-imports it, hence the __main__ guard). The time per step is the wall time from the start of the
first step after warm-up to the end of training, divided by the steps in it: it includes the
saves, what the trainer waited for them, and the wait for the last one at the end. The table
(last) gives it per case and its ratio to the run without checkpoints.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name -> checkpoint flags
    "no checkpoint": [],
    "sync (disabled)": ["--checkpoint.enable", "--checkpoint.async_mode", "disabled"],
    "async": ["--checkpoint.enable", "--checkpoint.async_mode", "async"],
    "async_with_pinned_mem": ["--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem"],
}
SHAPES = {"debugmodel": (128, 4), "125M": (128, 4)}  # model -> (seq_len, global batch)


def child(argv: list[str], warmup: int, out: str) -> None:
    """Train with ``argv``; write the time per step after warm-up (saves included) to ``out``."""
    sys.path.insert(0, str(REPO))
    from torchtitan.config.manager import ConfigManager
    from torchtitan.trainer import Trainer

    trainer = Trainer(ConfigManager().parse_args(argv))
    starts = []
    step_fn = trainer.train_step

    def timed_step(*a, **kw):
        starts.append(time.perf_counter())
        return step_fn(*a, **kw)

    trainer.train_step = timed_step
    try:
        trainer.train()  # returns after the last save finished (async ones are waited for)
        end = time.perf_counter()
        steps = len(starts) - warmup
        Path(out).write_text(json.dumps({"step_s": (end - starts[warmup]) / steps, "steps": steps}))
    finally:
        trainer.close()


def run_case(flags: list[str], args, dump: str) -> dict:
    seq_len, batch = SHAPES[args.model]
    argv = [
        "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", dump, "--model.flavor", args.model,
        "--training.steps", str(args.steps), "--training.seq_len", str(seq_len),
        "--training.global_batch_size", str(batch), "--metrics.log_freq", str(args.steps),
        "--checkpoint.interval", str(args.every), *flags,
    ]
    out = os.path.join(dump, "result.json")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, __file__, "--child", out, "--warmup", str(args.warmup), "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"case failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ckpt = Path(dump) / "checkpoint"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / max(1, len(list(ckpt.glob("step-*"))))
    return {**json.loads(Path(out).read_text()), "ckpt_mb": size / 2**20 if ckpt.exists() else 0.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="debugmodel", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--every", type=int, default=5, help="checkpoint.interval (steps)")
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.child:
        return child(rest[1:] if rest[:1] == ["--"] else rest, args.warmup, args.child)
    results = {}
    for name, flags in CASES.items():
        with tempfile.TemporaryDirectory() as dump:
            results[name] = run_case(flags, args, dump)
        print(f"{name}: {results[name]['step_s']:.3f} s/step", flush=True)
    base = results["no checkpoint"]["step_s"]
    seq_len, batch = SHAPES[args.model]
    print(f"\n{args.model}, seq_len {seq_len}, batch {batch}, checkpoint every {args.every} steps, "
          f"{args.steps} steps (first {args.warmup} not timed), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print("| mode | s/step | vs no checkpoint | checkpoint size |")
    print("|---|---|---|---|")
    for name, r in results.items():
        size = f"{r['ckpt_mb']:.0f} MiB" if r["ckpt_mb"] else "-"
        print(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / base:.2f}x | {size} |")


if __name__ == "__main__":  # required: the async_with_pinned_mem checkpoint process re-imports this file
    main()

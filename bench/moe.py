"""Mixture-of-experts speed: grouped GEMM vs a loop over experts, EP2 vs one process, and the
share of the step spent in the expert-parallel all-to-all.

    python bench/moe.py [--steps 12] [--repeats 2] [--flavor debugmodel_moe] [--seq_len 256]

Each training case runs train.py in a fresh process (Qwen3-MoE, the debug config otherwise)
and reads the steady-state window (the last log window, after warm-up) from metrics.jsonl;
the cases alternate, ``--repeats`` times, and the median is printed. The all-to-all share
comes from torch.profiler over the steady-state steps of a 2-process EP run: the time of the
all-to-all ops and of the waits on them, as a share of the profiled step time on rank 0.
On CPU (gloo) the all-to-all is a blocking host copy; on a GPU (NCCL) it overlaps less
than it could: the share tells which side to work on.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from common import REPO, run_train

_A2A_OPS = ("all_to_all", "alltoall", "wait_tensor")


def cases(flavor: str, seq_len: int) -> dict[str, tuple[int, list[str]]]:
    base = ["--model.name", "qwen3", "--model.flavor", flavor, "--training.seq_len", str(seq_len)]
    return {
        "grouped GEMM, 1 process": (1, base + ["--moe.grouped_mm"]),
        "expert loop, 1 process": (1, base + ["--moe.no_grouped_mm"]),
        "grouped GEMM, EP2 (2 processes)": (2, base + ["--moe.grouped_mm", "--parallelism.ep", "2"]),
    }


def run_cases(args) -> dict[str, list[dict]]:
    results = {name: [] for name in cases(args.flavor, args.seq_len)}
    for _ in range(args.repeats):  # alternate the cases: drift of a busy machine hits all alike
        for name, (nproc, overrides) in cases(args.flavor, args.seq_len).items():
            results[name].append(run_train(overrides, args.steps, log_freq=max(1, args.steps // 2), nproc=nproc))
    return results


def a2a_worker(steps: int, overrides: list[str]) -> None:
    """Under torchrun: train, profile the last steps, print rank 0's all-to-all share."""
    sys.path.insert(0, str(REPO))
    from torch.profiler import ProfilerActivity, profile

    from torchtitan.config.manager import ConfigManager
    from torchtitan.trainer import Trainer

    cfg = ConfigManager().parse_args(["--job.config_file", str(REPO / "train_configs/debug_model.toml"),
                                      "--job.dump_folder", f"/tmp/bench_moe_a2a_{os.getpid()}", *overrides])
    trainer = Trainer(cfg)
    data = iter(trainer.dataloader)
    for _ in range(2):  # warm-up: allocator, first-step set-up
        trainer.train_step(data, False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(data, False)
        elapsed = time.perf_counter() - t0
    a2a_us = sum(e.cpu_time_total for e in prof.key_averages()
                 if any(op in e.key for op in _A2A_OPS))
    if trainer.rank == 0:
        print(f"A2A_SHARE {a2a_us / 1e6 / elapsed:.4f} {elapsed / steps:.4f}", flush=True)
    trainer.close()


def a2a_share(args) -> tuple[float, float] | None:
    base = cases(args.flavor, args.seq_len)["grouped GEMM, EP2 (2 processes)"][1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, "--a2a-worker", "--steps", str(args.steps), "--", *base]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if "A2A_SHARE" in line:
            share, step_s = line.split("A2A_SHARE", 1)[1].split()
            return float(share), float(step_s)
    print(f"all-to-all profile failed: {proc.stderr.strip().splitlines()[-3:]}")
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--flavor", default="debugmodel_moe")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--a2a-worker", action="store_true", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.a2a_worker:
        return a2a_worker(args.steps, [a for a in rest if a != "--"])
    results = run_cases(args)
    medians = {}
    print(f"{'case':<34}{'tok/s per device':>18}{'tok/s total':>14}{'step s':>9}")
    for name, records in results.items():
        ok = [r for r in records if "error" not in r]
        if not ok:
            print(f"{name:<34} failed: {records[-1]['error']}")
            continue
        nproc = cases(args.flavor, args.seq_len)[name][0]
        tps = statistics.median(r["tps"] for r in ok)
        medians[name] = tps * nproc
        step_s = statistics.median(r["step_time_s"] for r in ok)
        print(f"{name:<34}{tps:>18,.0f}{tps * nproc:>14,.0f}{step_s:>9.3f}")
    names = list(medians)
    if len(names) == 3:
        print(f"ratio grouped GEMM / expert loop (1 process): {medians[names[0]] / medians[names[1]]:.2f}")
        print(f"ratio EP2 total / 1 process: {medians[names[2]] / medians[names[0]]:.2f}")
    share = a2a_share(args)
    if share is not None:
        print(f"EP2 all-to-all share of step time (rank 0, profiled): {100 * share[0]:.1f}% "
              f"of {share[1]:.3f} s per step")


if __name__ == "__main__":
    main()

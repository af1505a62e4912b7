"""Tiny training runs for the tests: one process (``tiny_args`` + ``run``, through the hook runner)
or many (``tiny_overrides`` + ``torchrun``, gloo on CPU), and their losses and metrics read back.

Every layout trains the same tiny model from the same ``training.seed`` on the same global
batches, so each step's loss must match the single-process run within ``rtol``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from torchtitan.parallelisms.utils import free_port as _free_port  # re-exported for the tests

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "helpers" / "train_runner.py"


def tiny_overrides(dump: Path, cache: Path, steps: int = 5) -> list[str]:
    """The debug-shaped model made small: 4 layers of dim 64, 4 heads, 2 KV heads."""
    return [
        "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--tokenizer.cache_dir", str(cache),
        "--model.flavor", "debugmodel_tiny",
        "--model.n_layers", "4",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.global_batch_size", "8",
        "--lr_scheduler.warmup_steps", "2",
        "--metrics.log_freq", "1",
        "--comm.init_timeout_seconds", "120",
        "--comm.train_timeout_seconds", "120",
    ]


def torchrun(nproc: int, args: list[str], timeout: int = 600, check: bool = True,
             hooks: list[str] = (), script: Path | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc train.py args`` on localhost; one thread per rank.

    ``hooks`` (e.g. ["--sigterm-at-step", "5"]) run the script through tests/helpers/train_runner.py;
    ``script`` runs another script (e.g. tests/helpers/document_mask_worker.py) with the same args.
    """
    if script is not None:
        target = [str(script)]
    else:
        target = [str(RUNNER), *hooks, "--"] if hooks else [str(REPO / "train.py")]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
        *target, *args,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun x{nproc} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc


def read_losses(dump: Path) -> dict[int, float]:
    records = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def assert_losses_match(got: dict[int, float], ref: dict[int, float], rtol: float = 1e-5) -> float:
    worst = max_rel_diff(got, ref)
    assert worst <= rtol, f"worst relative loss difference {worst:.3e} > {rtol:.0e}\n got {got}\n ref {ref}"
    return worst


def tiny_args(dump: Path, cache: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--job.config_file", str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--tokenizer.cache_dir", str(cache),
        "--model.flavor", "debugmodel_tiny",
        "--training.steps", str(steps),
        "--training.seq_len", "64",
        "--training.global_batch_size", "4",
        "--training.local_batch_size", "2",  # 2 microbatches: accumulation is in the path
        "--lr_scheduler.warmup_steps", "3",
        "--metrics.log_freq", "1",
        *extra,
    ]


def run(args: list[str], kill_step: int | None = None, sigterm_step: int | None = None,
        nan_step: int | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(RUNNER)]
    for flag, step in (("--kill-during-save", kill_step), ("--sigterm-at-step", sigterm_step),
                       ("--nan-at-step", nan_step)):
        if step is not None:
            cmd += [flag, str(step)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd + ["--", *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def metrics(dump: Path) -> dict[int, dict]:
    records = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records}  # a resumed run appends; the later record wins

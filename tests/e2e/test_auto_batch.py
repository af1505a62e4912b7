"""Automatic local batch and the OOM retry in real runs: the same global batch gives the same losses.

The OOM is injected (tests/helpers/oom_runner.py): a forward/backward whose microbatches hold more
rows than a threshold raises torch.OutOfMemoryError, as a GPU too small for that local batch would.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import assert_losses_match, metrics, read_losses, run, tiny_args, tiny_overrides, torchrun
from torchtitan.components.auto_batch import GIB, host_peak
from torchtitan.components.model_builder import build_model_args
from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.config.manager import ConfigManager
from torchtitan.models.registry import get_spec
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.planner.memory import memory_for_job

REPO = Path(__file__).resolve().parents[2]
OOM_RUNNER = REPO / "tests" / "helpers" / "oom_runner.py"
STEPS = 4
# One process: 8 rows per step. seq_len 256: local batches 2 and 4 differ by ~40 MiB of estimated RAM,
# far above the run-to-run spread of the resident memory the CPU estimate starts from (~1 MiB).
GLOBAL = ["--training.global_batch_size", "8", "--training.seq_len", "256"]


def args(dump: Path, cache: Path, *extra: str) -> list[str]:
    return tiny_args(dump, cache, STEPS, *GLOBAL, *extra)


def run_with_oom(train_args: list[str], *oom: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(OOM_RUNNER), *oom, "--", *train_args], capture_output=True,
                          text=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def same_run(got: Path, ref: Path) -> None:
    """Every step's loss, grad norm, lr and tokens seen equal: one update per step, same data."""
    a, b = metrics(got), metrics(ref)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in ("loss", "grad_norm", "lr", "tokens_seen"):
            assert a[step][key] == b[step][key], (step, key, a[step][key], b[step][key])


@pytest.fixture(scope="module")
def explicit(tmp_path_factory, cache_dir) -> dict:
    """Runs of the same global batch of 8: local 2 (accumulation 4) and auto, which with the host's
    memory takes all 8 rows (no accumulation); "auto_log" is the latter's stderr."""
    dumps = {2: tmp_path_factory.mktemp("local2"), 8: tmp_path_factory.mktemp("auto_host")}
    run(args(dumps[2], cache_dir, "--training.local_batch_size", "2"))
    dumps["auto_log"] = run(args(dumps[8], cache_dir, "--training.local_batch_size", "0")).stderr
    return dumps


def peak(cache: Path, local_bs: int) -> int:
    """The tensor estimate the trainer's auto choice starts from, for the config of ``args``."""
    cfg = ConfigManager().parse_args(args(Path("unused"), cache))
    p = cfg.parallelism
    dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, 1, ep=p.ep)
    vocab = build_tokenizer(cfg.tokenizer.path, cfg.tokenizer.cache_dir).n_words
    model_args = build_model_args(cfg, get_spec(cfg.model.name), vocab)
    return memory_for_job(cfg, dims, model_args, local_bs, "cpu").total


def test_auto_picks_the_largest_batch_that_fits_with_the_same_losses(tmp_path, cache_dir, explicit):
    margin = 0.1
    resident = int(re.search(r"this process's resident (\d+) MiB", explicit["auto_log"]).group(1)) * 2**20
    # 2 fits, 4 does not: halfway between their CPU peaks (resident + allocator slack x tensors).
    limit = (host_peak(peak(cache_dir, 2), resident) + host_peak(peak(cache_dir, 4), resident)) / 2 / (1 - margin)
    proc = run(args(tmp_path, cache_dir, "--training.local_batch_size", "0", "--training.memory_limit_gib",
                    f"{limit / GIB:.6f}", "--training.memory_margin", str(margin)))
    assert re.search(r"auto local batch: 2 \(accumulation 4\): estimated peak [\d.]+ GiB of [\d.]+ GiB "
                     r"\(limit [\d.]+ GiB, margin 10%\) from training.memory_limit_gib; this process's resident",
                     proc.stderr), proc.stderr
    same_run(tmp_path, explicit[2])
    assert_losses_match(read_losses(tmp_path), read_losses(explicit[8]), rtol=1e-5)  # accumulation reorders sums


def test_auto_with_the_host_memory_takes_the_whole_batch(explicit):
    assert re.search(r"auto local batch: 8 \(accumulation 1\): .* from (physical memory|cgroup limit).* / 1 "
                     r"process\(es\)", explicit["auto_log"]), explicit["auto_log"][-3000:]


def test_auto_when_nothing_fits_is_one_line(tmp_path, cache_dir):
    proc = run(args(tmp_path, cache_dir, "--training.local_batch_size", "0", "--training.memory_limit_gib",
                    "0.001"), check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"even a local batch of 1 needs an estimated [\d.]+ GiB, over the usable 0.9 MiB \(limit "
                     r"1.0 MiB, margin 10%\) from training.memory_limit_gib; use more GPUs", errors[0]), errors[0]


def test_auto_on_cpu_keeps_the_measured_peak_under_the_limit(tmp_path, cache_dir):
    """The debug model (vocab 4096: fp32 logits dominate), 16 rows of seq 256 and 1 GiB: the limit binds
    (local 8 alone peaks at ~1.1 GiB measured; here local 2 or 4 is chosen, from the process's resident
    memory and the tensors), and the peak resident memory of every step (metrics: VmHWM per log window)
    stays under the limit."""
    limit_gib = 1.0
    proc = run(tiny_args(tmp_path, cache_dir, 2, "--model.flavor", "debugmodel", "--training.seq_len", "256",
                         "--training.global_batch_size", "16", "--training.local_batch_size", "0",
                         "--training.memory_limit_gib", str(limit_gib)))
    chosen = re.search(r"auto local batch: (\d+) \(accumulation (\d+)\): estimated peak ([\d.]+) GiB", proc.stderr)
    assert chosen and int(chosen.group(2)) > 1, proc.stderr[-3000:]  # the limit binds
    measured = max(r["memory_gib"] for r in metrics(tmp_path).values())
    print(f"local {chosen.group(1)}: estimated {chosen.group(3)} GiB, measured peak RSS {measured:.2f} GiB")
    assert measured < limit_gib


def test_oom_at_local_4_retries_the_step_at_local_2(tmp_path, cache_dir, explicit):
    proc = run_with_oom(args(tmp_path, cache_dir, "--training.local_batch_size", "4"), "--oom-above", "2")
    assert proc.stderr.count("injected OOM") == 1, proc.stderr[-3000:]
    assert ("out of memory on rank(s) [0] at local batch 4 (accumulation 2): retrying the step at local batch 2 "
            "(accumulation 4)") in proc.stderr
    same_run(tmp_path, explicit[2])  # bit-identical: the same step from the same state, once


@pytest.mark.slow  # two runs, ~40 s: CI keeps the retry's success paths
def test_oom_twice_or_with_the_retry_off_fails(tmp_path, cache_dir):
    again = run_with_oom(args(tmp_path / "a", cache_dir, "--training.local_batch_size", "4"), "--oom-above", "1",
                         check=False)
    assert again.returncode != 0 and again.stderr.count("injected OOM") == 2  # lowered once only
    off = run_with_oom(args(tmp_path / "b", cache_dir, "--training.local_batch_size", "4", "--training.no_oom_retry"),
                       "--oom-above", "2", check=False)
    assert off.returncode != 0 and off.stderr.count("injected OOM") == 1 and "retrying" not in off.stderr


def two_rank_args(dump: Path, cache: Path, local_bs: int) -> list[str]:
    """2 ranks (FSDP over gloo), global 16: 8 rows per rank."""
    return tiny_overrides(dump, cache, STEPS) + ["--training.global_batch_size", "16",
                                                 "--training.local_batch_size", str(local_bs)]


@pytest.fixture(scope="module")
def two_ranks_local2(tmp_path_factory, cache_dir) -> Path:
    dump = tmp_path_factory.mktemp("fsdp_local2")
    torchrun(2, two_rank_args(dump, cache_dir, 2))  # accumulation 4
    return dump


@pytest.mark.parametrize("oom, failed", [
    (["--at", "end", "--rank", "0"], "[0]"),
    pytest.param(["--at", "loss", "--skip", "1"], "[0, 1]", marks=pytest.mark.slow),  # ~1 min of CI saved
], ids=["rank0-after-backward", "every-rank-second-microbatch"])
def test_two_ranks_retry_together(tmp_path, cache_dir, two_ranks_local2, oom, failed):
    """At local 4 (accumulation 2) an OOM on rank 0 alone after the step's collectives, or on every
    rank at the loss of the second microbatch (the first one's gradients accumulated, unsharded, in
    FSDP): both ranks discard the attempt, lower to 2 and match the explicit local-2 run."""
    proc = torchrun(2, ["--oom-above", "2", *oom, "--", *two_rank_args(tmp_path, cache_dir, 4)], script=OOM_RUNNER)
    assert proc.stderr.count("injected OOM") == failed.count(",") + 1, proc.stderr[-3000:]
    retried = re.findall(r"\[rank(\d)\].*out of memory on rank\(s\) (\[[\d, ]+\]) at local batch 4 \(accumulation 2\): "
                         r"retrying the step at local batch 2 \(accumulation 4\)", proc.stderr)
    assert sorted(retried) == [("0", failed), ("1", failed)], proc.stderr[-3000:]
    same_run(tmp_path, two_ranks_local2)

"""Multi-process fault tolerance on CPU (gloo, torchrun): a lost rank, a crashed attempt restarted by
torchrun, a non-finite loss, a preemption. Nothing hangs, and every resume is exact: each later
loss equals the uninterrupted run's bitwise (metrics.jsonl appends; a later record for a step wins).

Faults are injected by tests/helpers/train_runner.py hooks (--kill-rank-at-step, --fail-at-step,
--nan-at-step, --sigterm-at-step).
"""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import _free_port, tiny_overrides, torchrun

REPO = Path(__file__).resolve().parents[2]
STEPS, INTERVAL = 8, 3
# Short collective timeouts: a rank waiting for a dead peer fails within seconds, not minutes.
SHORT_TIMEOUTS = ["--comm.init_timeout_seconds", "60", "--comm.train_timeout_seconds", "20"]
GUARD_S = 300  # subprocess timeout: a hang fails the test instead of blocking CI


def ft_args(dump: Path, cache: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(dump, cache, STEPS), *SHORT_TIMEOUTS,
            "--checkpoint.enable", "--checkpoint.interval", str(INTERVAL), *extra]


def records(dump: Path) -> dict[int, dict]:
    lines = (dump / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}  # a resumed run appends: the later record wins


def assert_same_losses(got: dict[int, dict], ref: dict[int, dict], steps) -> None:
    for step in steps:
        assert got[step]["loss"] == ref[step]["loss"], f"step {step}: {got[step]['loss']} != {ref[step]['loss']}"
        assert got[step]["grad_norm"] == ref[step]["grad_norm"], f"step {step}"


def complete_steps(dump: Path) -> list[str]:
    return sorted(p.name for p in (dump / "checkpoint").iterdir() if (p / ".metadata").is_file())


def run_timed(nproc: int, args: list[str], hooks: list[str] = (), check: bool = True):
    t0 = time.monotonic()
    proc = torchrun(nproc, args, timeout=GUARD_S, check=check, hooks=list(hooks))
    return proc, time.monotonic() - t0


@pytest.fixture(scope="module")
def reference2(tmp_path_factory, cache_dir) -> dict[int, dict]:
    """The uninterrupted 2-rank run (with the same checkpoint saves) every 2-rank test compares with."""
    dump = tmp_path_factory.mktemp("ref2")
    torchrun(2, ft_args(dump, cache_dir), timeout=GUARD_S)
    return records(dump)


# ---- a lost rank: fail fast, resume exactly ------------------------------------------------------
@pytest.mark.slow
def test_sigkill_one_rank_of_four_fails_fast_and_the_rerun_resumes_exactly(tmp_path, cache_dir):
    ref = tmp_path / "ref"
    torchrun(4, ft_args(ref, cache_dir), timeout=GUARD_S)
    dump = tmp_path / "run"
    proc, seconds = run_timed(4, ft_args(dump, cache_dir), hooks=["--kill-rank-at-step", "2", "5"], check=False)
    assert proc.returncode != 0
    assert seconds < 120, f"the job took {seconds:.0f}s to notice the dead rank"  # no hang
    assert complete_steps(dump) == ["step-3"]  # the last complete checkpoint before the kill
    torchrun(4, ft_args(dump, cache_dir), timeout=GUARD_S)
    assert_same_losses(records(dump), records(ref), range(1, STEPS + 1))


# ---- torchrun restarts a failed attempt by itself -----------------------------------------------
def torchrun_with_restarts(nproc: int, args: list[str], hooks: list[str], max_restarts: int):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--max-restarts", str(max_restarts), "--rdzv_backend", "c10d",
           "--rdzv_endpoint", f"127.0.0.1:{_free_port()}",
           str(REPO / "tests" / "helpers" / "train_runner.py"), *hooks, "--", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=GUARD_S, cwd=REPO)


@pytest.mark.slow
def test_max_restarts_recovers_from_a_failure_and_matches_the_uninterrupted_run(tmp_path, cache_dir, reference2):
    # Rank 1 raises at step 5 on the first attempt only (TORCHELASTIC_RESTART_COUNT == 0).
    proc = torchrun_with_restarts(2, ft_args(tmp_path, cache_dir), ["--fail-at-step", "1", "5"], max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "injected failure on rank 1 at step 5" in proc.stderr
    assert "loading checkpoint" in proc.stderr and "step-3" in proc.stderr  # the restart resumed
    assert_same_losses(records(tmp_path), reference2, range(1, STEPS + 1))
    assert complete_steps(tmp_path) == ["step-3", "step-6", "step-8"]


# ---- non-finite loss on 2 ranks -------------------------------------------------------------------
def _model_weights(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.name}.pt"
    dcp_to_torch_save(ckpt, out)
    return torch.load(out, weights_only=True)["model"]


@pytest.mark.slow
def test_skip_nan_inf_skips_the_update_on_every_rank(tmp_path, cache_dir, reference2):
    """NaN loss at step 4: no rank updates (step-4 weights == step-3 weights), the skip is counted,
    and training goes on with finite losses."""
    args = ft_args(tmp_path, cache_dir, "--training.skip_nan_inf", "--checkpoint.interval", "1")
    torchrun(2, args, hooks=["--nan-at-step", "4", "--sigterm-at-step", "5"], timeout=GUARD_S)
    before = _model_weights(tmp_path / "checkpoint" / "step-3", tmp_path)
    after = _model_weights(tmp_path / "checkpoint" / "step-4", tmp_path)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed in the skipped step"
    m = records(tmp_path)
    assert_same_losses(m, reference2, range(1, 4))
    assert m[3]["skipped_steps"] == 0 and m[4]["skipped_steps"] == 1 and m[5]["skipped_steps"] == 1
    assert math.isnan(m[4]["loss"]) and math.isfinite(m[5]["loss"])


def test_non_finite_loss_stops_every_rank_naming_the_step(tmp_path, cache_dir):
    """Without training.skip_nan_inf: both ranks stop at step 4 with one message each; no hang."""
    args = [*tiny_overrides(tmp_path, cache_dir, 6), *SHORT_TIMEOUTS]
    proc, seconds = run_timed(2, args, hooks=["--nan-at-step", "4"], check=False)
    assert proc.returncode != 0
    for rank in (0, 1):
        line = next((x for x in proc.stderr.splitlines() if f"[rank{rank}] error: FloatingPointError" in x), "")
        assert "not finite at step 4" in line and "skip_nan_inf" in line, proc.stderr[-4000:]
    assert records(tmp_path).keys() == {1, 2, 3}


# ---- preemption -------------------------------------------------------------------------------------
def test_sigterm_checkpoints_exits_zero_and_resumes_exactly(tmp_path, cache_dir, reference2):
    proc = torchrun(2, ft_args(tmp_path, cache_dir), hooks=["--sigterm-at-step", "5"], timeout=GUARD_S)
    assert proc.returncode == 0 and "stopped cleanly after step 5" in proc.stderr
    assert complete_steps(tmp_path) == ["step-3", "step-5"]
    torchrun(2, ft_args(tmp_path, cache_dir), timeout=GUARD_S)
    assert_same_losses(records(tmp_path), reference2, range(1, STEPS + 1))

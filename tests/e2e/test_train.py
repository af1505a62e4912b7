"""End-to-end single-process training: exact resume, crash-safe checkpoints, metrics."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import RUNNER, metrics, run, tiny_args

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference_dump(tmp_path_factory, cache_dir) -> Path:
    """The uninterrupted 20-step run every resume is compared with (its dump folder)."""
    dump = tmp_path_factory.mktemp("ref_train")
    run(tiny_args(dump, cache_dir, 20, "--metrics.enable_tensorboard"))
    return dump


@pytest.fixture(scope="module")
def reference(reference_dump) -> dict[int, dict]:
    return metrics(reference_dump)


def test_metrics_have_the_documented_keys(reference):
    assert sorted(reference) == list(range(1, 21))
    for key in ("step", "loss", "grad_norm", "lr", "tps", "mfu", "memory_gib", "data_loading_pct"):
        assert key in reference[20]
    assert reference[20]["mfu"] is None  # CPU without metrics.peak_flops
    assert reference[20]["loss"] < reference[1]["loss"]


def test_resume_is_bitwise_identical(tmp_path, cache_dir, reference):
    """10 steps, stop (preemption at step 10), resume, 10 more: every step equals the 20-step run."""
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "1000"]
    proc = run(tiny_args(tmp_path, cache_dir, 20, *ckpt), sigterm_step=10)
    assert "stopped cleanly after step 10" in proc.stderr
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["step-10"]
    assert (tmp_path / "checkpoint" / "step-10" / ".metadata").is_file()
    assert (tmp_path / "checkpoint" / "step-10" / "config.toml").is_file()
    run(tiny_args(tmp_path, cache_dir, 20, *ckpt))
    resumed = metrics(tmp_path)
    for step in range(1, 21):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"
        assert resumed[step]["grad_norm"] == reference[step]["grad_norm"], f"step {step}"
        assert resumed[step]["lr"] == reference[step]["lr"], f"step {step}"


def test_killed_save_leaves_the_previous_checkpoint_as_the_one_resumed(tmp_path, cache_dir, reference):
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "5"]
    proc = run(tiny_args(tmp_path, cache_dir, 20, *ckpt), kill_step=10, check=False)
    assert proc.returncode != 0
    folder = tmp_path / "checkpoint"
    assert (folder / "step-5" / ".metadata").is_file()
    assert (folder / "step-10.tmp").is_dir() and not (folder / "step-10").exists()
    proc = run(tiny_args(tmp_path, cache_dir, 20, *ckpt))
    assert "skipping incomplete checkpoint" in proc.stderr
    assert "step-5" in proc.stderr.split("loading checkpoint", 1)[1].splitlines()[0]
    resumed = metrics(tmp_path)
    for step in range(6, 21):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, cache_dir, reference):
    """Preemption: SIGTERM mid-run saves a checkpoint, exits 0, and the rerun continues exactly."""
    import signal
    import time

    args = tiny_args(tmp_path, cache_dir, 20, "--checkpoint.enable", "--checkpoint.interval", "1000")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(RUNNER), "--", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    jsonl = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (jsonl.exists() and len(jsonl.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stop requested" in err
    saved = [p.name for p in (tmp_path / "checkpoint").iterdir()]
    assert len(saved) == 1 and saved[0].startswith("step-") and saved[0] != "step-20", saved
    run(args)
    resumed = metrics(tmp_path)
    for step in range(1, 21):
        assert resumed[step]["loss"] == reference[step]["loss"], f"step {step}"


def test_bad_batch_split_is_a_clear_error(tmp_path, cache_dir):
    proc = run(tiny_args(tmp_path, cache_dir, 2, "--training.local_batch_size", "3"), check=False)
    assert proc.returncode != 0
    assert "multiple of local_batch_size=3" in proc.stderr


def test_load_step_that_does_not_exist_is_a_clear_error(tmp_path, cache_dir):
    args = tiny_args(tmp_path, cache_dir, 2, "--checkpoint.enable", "--checkpoint.load_step", "7")
    proc = run(args, check=False)
    assert proc.returncode != 0
    assert "checkpoint.load_step=7" in proc.stderr and "complete ones" in proc.stderr


def test_tensorboard_and_plot_outputs(reference_dump, tmp_path_factory):
    dump = reference_dump
    assert list((dump / "tb").glob("events.out.tfevents.*"))
    out = tmp_path_factory.mktemp("plot") / "m.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(dump / "metrics.jsonl"),
                           "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_stops_with_the_step_named(tmp_path, cache_dir):
    proc = run(tiny_args(tmp_path, cache_dir, 6), nan_step=4, check=False)
    assert proc.returncode != 0
    assert "not finite at step 4" in proc.stderr and "skip_nan_inf" in proc.stderr


def _saved_model(ckpt_dir: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ckpt_dir, tmp / "flat.pt")
    return torch.load(tmp / "flat.pt", weights_only=True)["model"]


def test_skip_nan_inf_skips_and_counts_the_step(tmp_path, cache_dir, reference):
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "1000", "--training.skip_nan_inf"]
    run(tiny_args(tmp_path / "a", cache_dir, 20, *ckpt), sigterm_step=3)
    run(tiny_args(tmp_path / "b", cache_dir, 20, *ckpt), nan_step=4, sigterm_step=4)
    before = _saved_model(tmp_path / "a" / "checkpoint" / "step-3", tmp_path / "a")
    after = _saved_model(tmp_path / "b" / "checkpoint" / "step-4", tmp_path / "b")
    assert before.keys() == after.keys()
    for name in before:  # the skipped update left every weight untouched
        assert torch.equal(before[name], after[name]), name
    run(tiny_args(tmp_path / "b", cache_dir, 20, *ckpt))  # resume and finish
    m = metrics(tmp_path / "b")
    assert m[3]["skipped_steps"] == 0 and m[4]["skipped_steps"] == 1 and m[20]["skipped_steps"] == 1
    assert m[3]["loss"] == reference[3]["loss"] and math.isnan(m[4]["loss"])
    assert all(math.isfinite(m[s]["loss"]) for s in range(5, 21))


def test_inconsistent_float8_options_end_to_end(tmp_path, cache_dir):
    proc = run(tiny_args(tmp_path, cache_dir, 1, "--float8.enable_float8_linear",
                         "--float8.precompute_float8_dynamic_scale_for_fsdp"), check=False)
    assert proc.returncode == 1
    assert "error: ValueError: float8.precompute_float8_dynamic_scale_for_fsdp precomputes" in proc.stderr

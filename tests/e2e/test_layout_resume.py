"""Checkpoints are layout-independent: saved under FSDP2 x TP2, resumed under PP2 x FSDP2 and on one
process, the next losses match the uninterrupted run. Plus the degree checks a user hits first."""

import pytest

from tests.helpers.runs import assert_losses_match, read_losses, tiny_overrides, torchrun
from torchtitan.parallelisms.parallel_dims import ParallelDims

FSDP2_TP2 = ["--parallelism.tp", "2"]
PP2_FSDP2 = ["--parallelism.pp", "2"]
CKPT = ["--checkpoint.enable", "--checkpoint.interval", "1000"]


def test_checkpoint_resumes_under_other_layouts(tmp_path, cache_dir):
    uninterrupted = tmp_path / "full"
    torchrun(4, tiny_overrides(uninterrupted, cache_dir, 10) + FSDP2_TP2)
    reference = read_losses(uninterrupted)

    saved = tmp_path / "saved"
    proc = torchrun(4, tiny_overrides(saved, cache_dir, 10) + FSDP2_TP2 + CKPT, hooks=["--sigterm-at-step", "5"])
    assert "stopped cleanly after step 5" in proc.stderr
    assert (saved / "checkpoint" / "step-5" / ".metadata").is_file()

    for name, nproc, layout in (("pp2xfsdp2", 4, PP2_FSDP2), ("one_process", 1, [])):
        resumed = tmp_path / name
        (resumed / "checkpoint").mkdir(parents=True)
        (resumed / "checkpoint" / "step-5").symlink_to(saved / "checkpoint" / "step-5")
        torchrun(nproc, tiny_overrides(resumed, cache_dir, 10) + layout + CKPT)
        losses = read_losses(resumed)
        assert sorted(losses) == list(range(6, 11)), f"{name} did not resume at step 5: {sorted(losses)}"
        worst = assert_losses_match(losses, {s: reference[s] for s in range(6, 11)}, rtol=1e-5)
        print(f"\nresume under {name}: worst relative loss difference {worst:.2e}")


@pytest.mark.parametrize(
    "degrees,world,pattern",
    [
        (dict(dp_replicate=1, dp_shard=2, cp=1, tp=2, pp=1), 8, r"dp_shard=2 x cp=1 x tp=2 x pp=1 must equal world_size=8"),
        (dict(dp_replicate=3, dp_shard=-1, cp=1, tp=1, pp=1), 4, r"cannot fill dp_shard=-1"),
        (dict(dp_replicate=1, dp_shard=-1, cp=0, tp=1, pp=1), 4, r"parallelism.cp must be >= 1"),
    ],
)
def test_degrees_not_matching_the_world_size_are_a_clear_error(degrees, world, pattern):
    with pytest.raises(ValueError, match=pattern):
        ParallelDims(**degrees, world_size=world)


def test_degree_mismatch_end_to_end_names_every_degree(tmp_path, cache_dir):
    proc = torchrun(2, tiny_overrides(tmp_path, cache_dir, 1) + ["--parallelism.tp", "4"], check=False)
    assert proc.returncode != 0
    assert "tp=4" in proc.stderr and "world_size=2" in proc.stderr


def test_seq_len_not_divisible_by_2cp_end_to_end(tmp_path, cache_dir):
    args = tiny_overrides(tmp_path, cache_dir, 1) + ["--parallelism.cp", "2", "--training.seq_len", "66"]
    proc = torchrun(2, args, check=False)
    assert proc.returncode != 0
    assert "training.seq_len=66 must be divisible by 2 x cp = 4" in proc.stderr

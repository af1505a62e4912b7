"""Two "nodes" on one machine: two torchrun launchers (--nnodes 2) meeting at one c10d rendezvous
train exactly like one launcher with all the processes; plus the comm timeouts."""

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from tests.helpers.runs import REPO, _free_port, read_losses, tiny_overrides, torchrun
from torchtitan.config.job_config import Comm
from torchtitan.parallelisms import utils as dist_utils

STEPS = 3
SMALL = ["--model.n_layers", "2"]  # start-up dominates; fewer layers still shard per block


def two_node_torchrun(nproc_per_node: int, args: list[str], timeout: int = 600) -> None:
    """One torchrun per "node", both on localhost, rendezvous through c10d on one port.

    Which launcher becomes node 0 is decided by the rendezvous (``--node_rank`` is a hint only
    for static rendezvous), as on a real cluster.
    """
    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = []
    for node_rank in range(2):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", str(nproc_per_node), "--rdzv_id", "multinode-test",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, str(REPO / "train.py"), *args,
        ]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=env, cwd=REPO))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for node_rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"node {node_rank} failed ({p.returncode}):\n{out[-6000:]}"


def _compare(tmp_path, cache_dir, extra: list[str]) -> None:
    common = [*SMALL, *extra, "--checkpoint.enable", "--checkpoint.interval", str(STEPS)]
    multi, single = tmp_path / "two_nodes", tmp_path / "one_node"
    two_node_torchrun(2, [*tiny_overrides(multi, cache_dir, STEPS), *common])
    torchrun(4, [*tiny_overrides(single, cache_dir, STEPS), *common])
    got, ref = read_losses(multi), read_losses(single)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == ref, f"two nodes {got}\none node {ref}"  # same ranks, same collectives: bitwise
    for dump in (multi, single):
        assert (dump / "checkpoint" / f"step-{STEPS}" / ".metadata").is_file()


def test_two_nodes_match_one_node_fsdp(tmp_path, cache_dir):
    _compare(tmp_path, cache_dir, ["--parallelism.dp_shard", "4"])


@pytest.mark.slow
def test_two_nodes_match_one_node_fsdp_x_tp(tmp_path, cache_dir):
    _compare(tmp_path, cache_dir, ["--parallelism.dp_shard", "2", "--parallelism.tp", "2"])


# ---- comm timeouts ---------------------------------------------------------------------------

@pytest.fixture
def gloo_world_of_one(monkeypatch, tmp_path):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(key, value)
    dist_utils.init_distributed(Comm(init_timeout_seconds=300), str(tmp_path))
    yield dist.distributed_c10d._get_default_group()
    dist.destroy_process_group()


def _timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


def test_process_group_starts_with_the_init_timeout_and_can_be_tightened(gloo_world_of_one):
    group = gloo_world_of_one
    assert _timeout(group) == timedelta(seconds=300)
    assert dist_utils.set_pg_timeout(42)
    assert _timeout(group) == timedelta(seconds=42)
    dist.all_reduce(torch.ones(1))  # still works with the new timeout


def test_set_pg_timeout_falls_back_then_warns(gloo_world_of_one, monkeypatch, caplog):
    group = gloo_world_of_one
    monkeypatch.delattr(dist.distributed_c10d, "_set_pg_timeout")  # an older/newer torch without it
    assert dist_utils.set_pg_timeout(17)
    assert _timeout(group) == timedelta(seconds=17)

    def broken(self, timeout):
        raise RuntimeError("not supported by this backend")

    monkeypatch.setattr(type(group), "set_timeout", broken)
    warnings = []
    monkeypatch.setattr(dist_utils.logger, "warning", warnings.append)
    assert not dist_utils.set_pg_timeout(5)
    assert "comm.train_timeout_seconds is ignored" in warnings[0]
    assert _timeout(group) == timedelta(seconds=17)


def test_trainer_tightens_the_timeout_after_the_first_step(tmp_path, cache_dir):
    """A real 2-rank run: every rank switches once, after its first step."""
    args = [*tiny_overrides(tmp_path, cache_dir, 2), "--comm.train_timeout_seconds", "37"]
    proc = torchrun(2, [*args, "--model.n_layers", "1"])
    log = proc.stdout + proc.stderr
    assert log.count("collective timeout set to 37s after the first step") == 2, log[-3000:]

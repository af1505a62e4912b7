"""The launcher's checks before any rank starts (torchtitan/tools/launch_control.py) and the
layout line every run logs (ParallelDims.layout_line), in-process: no rank is started."""

from pathlib import Path

import pytest
from torch.distributed.run import parse_args

from torchtitan.config.manager import load_toml
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools import launch_control

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "train_configs" / "debug_model.toml")


def torchrun_args(nproc: int, *train_args: str):
    return parse_args(["--standalone", "--nproc_per_node", str(nproc), str(REPO / "train.py"),
                       "--job.config_file", CONFIG, "--model.flavor", "debugmodel_tiny", *train_args])


@pytest.mark.parametrize("degrees, ep, expected", [
    ((1, 1, 1, 1, 1, 1), 1, ["layout: 1 rank, no parallelism"]),
    ((1, -1, 1, 1, 1, 2), 2, ["2 ranks = dp_shard 2 (FSDP)", "ep 2 (experts, borrows dp_shard: no extra ranks)"]),
    ((2, 2, 2, 2, 2, 32), 4, ["32 ranks = pp 2 (pipeline stages) x dp_replicate 2 (HSDP replicas) x dp_shard 2 "
                              "(FSDP) x cp 2 (sequence split", "x tp 2 (tensor)", "ep 4 (experts, borrows dp_shard "
                              "x cp", "data-parallel degree 4"]),
    ((2, 1, 1, 1, 1, 2), 1, ["2 ranks = dp_replicate 2 (DDP replicas)"]),
])
def test_layout_line_names_every_dimension_and_what_it_carries(degrees, ep, expected):
    line = ParallelDims(*degrees, ep=ep).layout_line()
    for fragment in expected:
        assert fragment in line, line


def test_start_line_reads_the_command_line_and_toml_alone():
    line = launch_control.start_line(["--standalone", "--nproc_per_node=2", "--role", "rank", "train.py",
                                      "--job.config_file", CONFIG, "--model.flavor", "debugmodel_tiny"])
    assert line == f"starting 2 processes of train.py: config {CONFIG}, model llama3 debugmodel_tiny"
    assert launch_control.start_line(["--nproc_per_node", "devices", "x.py"]).startswith(
        "starting a process per GPU (1 without CUDA) of x.py")


def test_preflight_checks_degrees_and_batch_against_the_world_size(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(launch_control, "_cores", lambda: 64)
    lines = launch_control.preflight(torchrun_args(2, "--training.global_batch_size", "4"))
    toml = load_toml(CONFIG)
    assert lines == [f"{toml['training']['steps']} steps into {toml['job']['dump_folder']}; "
                     f"layout: 2 ranks = dp_shard 2 (FSDP); data-parallel degree 2"]
    with pytest.raises(ValueError, match="tp=3 .* world_size=2"):
        launch_control.preflight(torchrun_args(2, "--parallelism.tp", "3"))
    with pytest.raises(ValueError, match="global_batch_size=6 does not divide by the data-parallel degree 4"):
        launch_control.preflight(torchrun_args(4, "--training.global_batch_size", "6"))


def test_more_processes_than_cores_warns(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(launch_control, "_cores", lambda: 2)
    lines = launch_control.preflight(torchrun_args(4, "--training.global_batch_size", "4"))
    assert lines[-1].startswith("warning: 4 processes x 1 thread(s) on 2 CPU core(s)") and "~2x slower" in lines[-1]
    assert not any("warning" in x for x in launch_control.preflight(torchrun_args(2)))


def test_unset_threads_split_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(launch_control, "_cores", lambda: 8)
    assert launch_control._default_threads(2) == 4

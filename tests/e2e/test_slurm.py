"""multinode_trainer.slurm with stub srun / scontrol / sbatch on PATH: the torchrun command it builds
(run through torchtitan.tools.launch)."""

import json
import os
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "multinode_trainer.slurm"

# Each stub appends {"argv": [...], "env": {...}} to $STUB_LOG as one JSON line.
STUB = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({{"prog": "{name}", "argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
{extra}
"""
SCONTROL_OUT = 'if sys.argv[1:3] == ["show", "hostnames"]: print("gpu-node-017\\ngpu-node-018")'


def _stubs(bin_dir: Path) -> None:
    bin_dir.mkdir()
    for name, extra in (("srun", ""), ("scontrol", SCONTROL_OUT), ("sbatch", "")):
        path = bin_dir / name
        path.write_text(STUB.format(name=name, extra=extra))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_script(tmp_path: Path, *args: str, **env_vars: str) -> list[dict]:
    _stubs(tmp_path / "bin")
    log = tmp_path / "calls.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NGPU", "CONFIG_FILE", "OMP_"))}
    env.update(
        PATH=f"{tmp_path / 'bin'}:{env['PATH']}", STUB_LOG=str(log),
        SLURM_JOB_ID="4242", SLURM_NNODES="2", SLURM_JOB_NODELIST="gpu-node-[017-018]",
        SLURM_CPUS_PER_TASK="32", SLURM_SUBMIT_DIR=str(REPO), **env_vars,
    )
    proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(x) for x in log.read_text().splitlines()]


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_srun_launches_torchrun_with_rendezvous_on_the_first_host(tmp_path):
    calls = run_script(tmp_path, "--training.steps", "7", "--metrics.log_freq", "1")
    scontrol = [c for c in calls if c["prog"] == "scontrol"]
    assert scontrol and scontrol[0]["argv"] == ["show", "hostnames", "gpu-node-[017-018]"]
    (srun,) = [c for c in calls if c["prog"] == "srun"]
    argv = srun["argv"]
    assert argv[:3] == ["python", "-m", "torchtitan.tools.launch"]  # torchrun, with one-line failure reports
    assert _opt(argv, "--nnodes") == "2"
    assert _opt(argv, "--nproc_per_node") == "8"  # NGPU_PER_NODE default
    assert _opt(argv, "--rdzv_id") == "4242"
    assert _opt(argv, "--rdzv_backend") == "c10d"
    assert _opt(argv, "--rdzv_endpoint") == "gpu-node-017:29500"
    train = argv.index("./train.py")
    assert argv[train + 1:] == ["--job.config_file", "./train_configs/llama3_8b.toml",
                                "--training.steps", "7", "--metrics.log_freq", "1"]
    env = srun["env"]
    assert env["NCCL_DEBUG"] == "WARN"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert env["OMP_NUM_THREADS"] == "4"  # 32 cpus per task / 8 processes
    assert Path(srun["env"]["PWD"]).resolve() == REPO  # ./train.py resolves in the submit dir
    assert not [c for c in calls if c["prog"] == "sbatch"]  # the script never resubmits itself


def test_env_vars_override_the_defaults(tmp_path):
    calls = run_script(tmp_path, NGPU_PER_NODE="4", CONFIG_FILE="./train_configs/llama3_70b.toml",
                       NCCL_DEBUG="INFO", OMP_NUM_THREADS="2", RDZV_PORT="29555")
    (srun,) = [c for c in calls if c["prog"] == "srun"]
    argv = srun["argv"]
    assert _opt(argv, "--nproc_per_node") == "4"
    assert _opt(argv, "--rdzv_endpoint") == "gpu-node-017:29555"
    assert argv[argv.index("./train.py") + 1:] == ["--job.config_file", "./train_configs/llama3_70b.toml"]
    assert srun["env"]["NCCL_DEBUG"] == "INFO"
    assert srun["env"]["OMP_NUM_THREADS"] == "2"


def test_sbatch_header_asks_for_one_task_per_node():
    header = [x for x in SCRIPT.read_text().splitlines() if x.startswith("#SBATCH")]
    opts = dict(x.split(None, 1)[1].lstrip("-").split("=", 1) for x in header)
    assert opts["ntasks-per-node"] == "1"
    assert {"nodes", "gpus-per-task", "cpus-per-task", "job-name", "output"} <= opts.keys()
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)  # syntax

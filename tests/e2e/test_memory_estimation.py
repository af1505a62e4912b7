"""Memory estimation: fake-tensor estimate vs the measured peak of a real 2-rank FSDP run, and the
shipped Llama 3 configs estimated as the README says (the shell script, no tokenizer file).

Measured = peak live tensor bytes on rank 0 over 2 train steps, from torch.profiler allocation
events (CPU) -- see torchtitan/tools/memory_estimation.py and BENCHMARKS.md.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, _free_port

SCRIPT = str(REPO / "scripts" / "estimate_memory.py")
SHELL = str(REPO / "scripts" / "run_memory_estimation.sh")
TOLERANCE = 0.15
GIB = 2**30


def _base(dump: Path, cache: Path, flavor: str) -> list[str]:
    return [
        "--config", str(REPO / "train_configs" / "debug_model.toml"),
        "--job.dump_folder", str(dump),
        "--tokenizer.cache_dir", str(cache),
        "--model.flavor", flavor,
        "--comm.init_timeout_seconds", "120",
        "--comm.train_timeout_seconds", "120",
    ]


def _estimate(args: list[str], ngpu: int, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, SCRIPT, "--ngpu", str(ngpu), "--json-out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "params" in proc.stdout and "total" in proc.stdout, proc.stdout
    return json.loads(out.read_text())


def _torchrun_measure(nproc: int, args: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--rdzv_backend",
           "c10d", "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", SCRIPT, "--measure", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-6000:]


def _check_against_real_run(tmp_path: Path, cache: Path, flavor: str) -> None:
    args = _base(tmp_path, cache, flavor)
    est = _estimate(args, 2, tmp_path / "estimate.json")
    assert est["method"] == "FSDPMemTracker", est
    measured_json = tmp_path / "measured.json"
    _torchrun_measure(2, ["--compare-to", str(tmp_path / "estimate.json"), "--json-out", str(measured_json), *args])
    measured = json.loads(measured_json.read_text())["rank0"]
    rel = abs(est["total"] - measured) / measured
    print(f"{flavor}: estimate {est['total'] / 2**30:.4f} GiB vs measured {measured / 2**30:.4f} GiB ({rel:.1%})")
    assert rel <= TOLERANCE, (est, measured)


def test_debug_model_fsdp_ws2_within_15_percent(tmp_path, cache_dir):
    _check_against_real_run(tmp_path, cache_dir, "debugmodel")


@pytest.mark.slow
def test_125m_fsdp_ws2_within_15_percent(tmp_path, cache_dir):
    _check_against_real_run(tmp_path, cache_dir, "125M")


def test_train_py_hook_estimates_tp_layout_analytically(tmp_path, cache_dir):
    """memory_estimation.enable makes train.py estimate (no training); TP takes the analytic path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WORLD_SIZE="4", RANK="0")
    args = [*_base(tmp_path, cache_dir, "debugmodel"), "--memory_estimation.enable", "--parallelism.tp", "2"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "method: analytic, world size 4" in proc.stdout, proc.stdout
    assert "dp_shard=2" in proc.stdout and "tp=2" in proc.stdout, proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists()  # it did not train


# ---- the shipped configs, end to end through scripts/run_memory_estimation.sh -------------------

# Parameters of our Llama 3.1 flavors with the 128256-token vocab (sum of numel of the model on meta).
LLAMA3_PARAMS = {"8B": 8.030e9, "70B": 70.554e9, "405B": 405.853e9}
TOKENIZER = REPO / "assets" / "tokenizer" / "original" / "tokenizer.model"  # what the configs name; not shipped


def _run_script(env: dict[str, str], *overrides: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("TORCHTITAN_TRACEBACK", "MEASURE")}
    full.update(OMP_NUM_THREADS="1", **env)
    return subprocess.run(["bash", SHELL, *overrides], capture_output=True, text=True, env=full, timeout=600,
                          cwd=REPO)


def _shipped_config_estimate(flavor: str, ngpu: int, nnodes: int) -> None:
    """The README's command on a shipped config: exit 0, a sane per-device total, and the notes.

    Sane, from the parameter count N over the world size W = NGPU x NNODES (FSDP x TP x PP shard
    every parameter once), with fp32 params and AdamW:
    - optimizer = AdamW's two fp32 moments of rank 0's shard = 8 N / W bytes, within 10% (rank 0's
      pipeline stages hold the embeddings and a few % more or fewer blocks than 1/pp);
    - total >= 0.9 x 12 N / W: params and both moments are alive for the whole step (the grads may
      already be freed at the peak);
    - total <= 16 N / W + 40 GiB: params, grads and moments plus activations and FSDP's gathered
      blocks, which these configs (torchtitan's settings for 80 GiB GPUs) keep well under 40 GiB;
      and total < 80 GiB.
    """
    config = f"train_configs/llama3_{flavor.lower()}.toml"
    proc = _run_script({"NGPU": str(ngpu), "NNODES": str(nnodes), "CONFIG_FILE": config})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    world = ngpu * nnodes
    assert f"world size {world}," in proc.stdout, proc.stdout
    rows = {line.split()[0]: float(line.split()[1]) * GIB for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("params", "grads", "optimizer", "activations", "total")}
    n = LLAMA3_PARAMS[flavor]
    print(f"llama3 {flavor} on {world} devices: {rows['total'] / GIB:.2f} GiB per device")
    assert abs(rows["optimizer"] - 8 * n / world) <= 0.1 * 8 * n / world, rows
    assert 0.9 * 12 * n / world <= rows["total"] <= min(16 * n / world + 40 * GIB, 80 * GIB), rows
    if TOKENIZER.exists():  # a checkout with the downloaded tokenizer: its size, as training
        assert "note: vocab 128256: the tokenizer's (" in proc.stdout, proc.stdout
    else:
        assert f"note: vocab 128256: llama3 {flavor}'s default (tokenizer.path" in proc.stdout, proc.stdout
    assert "note: compile.enable: estimated eager" in proc.stdout, proc.stdout


@pytest.mark.slow  # ~55 s on 2 CPU cores: FSDPMemTracker runs 2 eager steps of 32 blocks at seq_len 8192
def test_llama3_8b_config_as_in_the_readme():
    _shipped_config_estimate("8B", 8, 1)


@pytest.mark.slow  # CI runs the 405B one (TP x PP), the same analytic path
def test_llama3_70b_config_as_in_the_readme():  # ~15-25 s: the analytic path (TP), mostly imports
    _shipped_config_estimate("70B", 8, 4)  # README: NGPU=8 NNODES=4 CONFIG_FILE=train_configs/llama3_70b.toml


def test_llama3_405b_config_as_in_the_readme():  # ~15-20 s: analytic (TP x PP); 512 GPUs as the config says
    _shipped_config_estimate("405B", 8, 64)


def test_bad_inputs_are_one_error_line():
    """A bad flavor, config file or device count: exit 1, one ``error:`` line naming it, no traceback."""
    eight_b = {"NGPU": "8", "CONFIG_FILE": "train_configs/llama3_8b.toml"}
    cases = {
        "flavor": (eight_b, ["--model.flavor", "9B"], ["'9B'", "Valid flavors", "8B"]),
        "config": ({"CONFIG_FILE": "train_configs/nowhere.toml"}, [], ["nowhere.toml", "does not exist"]),
        "ngpu": ({"NGPU": "zero"}, [], ["--ngpu (or $NGPU)", "'zero'"]),
    }
    with ThreadPoolExecutor(len(cases)) as pool:  # interpreter and torch start-up dominate each
        procs = {name: pool.submit(_run_script, env, *args) for name, (env, args, _) in cases.items()}
        for name, (_, _, fragments) in cases.items():
            proc = procs[name].result()
            out = proc.stdout + proc.stderr
            assert proc.returncode == 1, (name, proc.returncode, out[-3000:])
            assert "Traceback" not in out, out[-3000:]
            lines = [line for line in out.splitlines() if "error:" in line]
            assert len(lines) == 1 and lines[0].startswith("error: ValueError: "), (name, out[-3000:])
            for fragment in fragments:
                assert fragment in lines[0], (name, fragment, lines[0])

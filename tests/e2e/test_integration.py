"""End-to-end runs of ./run_train.sh, one case per family, in the spirit of torchtitan's
OverrideDefinitions: the launcher, the config file, the overrides and the outputs together.
The default suite keeps a few cases; ``-m slow`` runs them all."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
slow = pytest.mark.slow

CASES = [
    # (id, NGPU, overrides)
    pytest.param(1, [], id="single_process"),
    pytest.param(2, ["--checkpoint.enable", "--checkpoint.interval", "2"], id="fsdp2+checkpoint"),
    pytest.param(2, ["--parallelism.tp", "2"], id="tp2_loss_parallel", marks=slow),
    pytest.param(2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "GPipe"], id="pp2_gpipe", marks=slow),
    pytest.param(2, ["--parallelism.cp", "2"], id="cp2", marks=slow),
    pytest.param(2, ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"], id="ddp2", marks=slow),
    pytest.param(4, ["--parallelism.dp_replicate", "2"], id="hsdp2x2", marks=slow),
    pytest.param(4, ["--parallelism.tp", "2", "--activation_checkpoint.mode", "selective",
                     "--activation_checkpoint.selective_ac_option", "op"], id="fsdp2xtp2+ac_op", marks=slow),
    pytest.param(4, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "Interleaved1F1B"],
                 id="pp2xfsdp2_interleaved", marks=slow),
    pytest.param(8, ["--parallelism.tp", "2", "--parallelism.pp", "2"], id="fsdp2xtp2xpp2", marks=slow),
]


@pytest.mark.parametrize("ngpu,overrides", CASES)
def test_run_train_sh(ngpu, overrides, tmp_path, cache_dir):
    env = dict(os.environ, NGPU=str(ngpu), OMP_NUM_THREADS="1", LOG_RANK="0")
    args = [
        "--job.dump_folder", str(tmp_path), "--tokenizer.cache_dir", str(cache_dir),
        "--model.flavor", "debugmodel_tiny", "--model.n_layers", "4",
        "--training.steps", "4", "--training.seq_len", "64", "--metrics.log_freq", "2", *overrides,
    ]
    proc = subprocess.run([str(REPO / "run_train.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (tmp_path / "config.toml").is_file()
    if "--checkpoint.enable" in overrides:
        assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-2", "step-4"]

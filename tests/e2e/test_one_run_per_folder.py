"""A dump folder belongs to one run, through ``python train.py``: a fresh start into a folder that
holds another run (another model's checkpoint, another config's metrics) is refused in one line
before it writes anything; ``--job.overwrite`` moves that run aside; a resume keeps the run id and
appends; a start that fails leaves no folder it created behind.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO, tiny_args, torchrun


def train(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCHTITAN_TRACEBACK", None)
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def records(dump: Path) -> list[dict]:
    return [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()]


def run_id(dump: Path) -> str:
    return json.loads((dump / "run.json").read_text())["run_id"]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """The tiny Llama, 2 steps, checkpoint step-2: a finished run's dump folder."""
    dump = tmp_path_factory.mktemp("llama")
    proc = train(tiny_args(dump, cache_dir, 2, "--checkpoint.enable"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dump


@pytest.fixture
def dump(trained, tmp_path) -> Path:
    copy = tmp_path / "dump"
    shutil.copytree(trained, copy)
    return copy


def test_another_model_or_config_is_refused_untouched_and_overwrite_moves_it_aside(dump, cache_dir):
    before, old = fingerprint(dump), run_id(dump)
    qwen = train(tiny_args(dump, cache_dir, 1, "--model.name", "qwen3", "--checkpoint.enable"))
    line = one_error_line(qwen)
    for fragment in (f"job.dump_folder='{dump}' holds another run (run_id {old}: 2 metrics records, "
                     "checkpoints step-2) of another model", "--job.dump_folder", "--job.overwrite"):
        assert fragment in line, line
    assert "  checkpoint " in qwen.stderr and "does not match the model: model." in qwen.stderr  # the detail below
    other_lr = train(tiny_args(dump, cache_dir, 2, "--optimizer.lr", "0.01"))  # same model, no resume
    assert "of another config" in one_error_line(other_lr)
    assert "  its config.toml differs: optimizer.lr is 0.001 there, 0.01 here" in other_lr.stderr
    assert fingerprint(dump) == before  # config.toml, provenance.json, metrics.jsonl, checkpoint: byte for byte

    replaced = train(tiny_args(dump, cache_dir, 1, "--model.name", "qwen3", "--job.overwrite"))
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    aside = dump / f"replaced-{old}"
    assert fingerprint(aside) == before  # moved, not deleted
    assert [r["run_id"] for r in records(dump)] == [run_id(dump)] and run_id(dump) != old
    assert "qwen3" in (dump / "config.toml").read_text() and not (dump / "checkpoint").exists()


def test_a_resume_keeps_the_run_id_and_appends(dump, cache_dir):
    first = run_id(dump)
    proc = train(tiny_args(dump, cache_dir, 3, "--checkpoint.enable"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"loading checkpoint {dump / 'checkpoint' / 'step-2'}" in proc.stderr
    assert [(r["step"], r["run_id"]) for r in records(dump)] == [(1, first), (2, first), (3, first)]
    assert run_id(dump) == first and f"run_id {first} (resume)" in proc.stderr


def test_a_failed_start_leaves_no_folder_behind(tmp_path, cache_dir):
    new = tmp_path / "new" / "run"
    proc = train(tiny_args(new, cache_dir, 2, "--training.local_batch_size", "3"))  # fails after the run lock
    assert "must be a multiple of local_batch_size=3" in one_error_line(proc)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_refusal_on_two_ranks_is_the_same_line_on_each(dump, cache_dir):
    before = fingerprint(dump)
    proc = torchrun(2, tiny_args(dump, cache_dir, 1, "--model.name", "qwen3"), check=False, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        head = f"[rank{rank}] error: ValueError: job.dump_folder"
        lines = [x for x in proc.stderr.splitlines() if x.startswith(head)]
        assert len(lines) == 1 and "holds another run" in lines[0], proc.stderr[-3000:]
    assert fingerprint(dump) == before

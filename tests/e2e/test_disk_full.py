"""A full disk or an I/O error during a save: one clear error (path, bytes needed and free, what
survived, what to do), the partial ``step-N.tmp`` removed at once, the previous checkpoint intact.

Two ways to fill a disk: a fault-injected DCP stream that raises ENOSPC once a byte budget is spent
(tests/helpers/full_disk.py; every platform), and a real tmpfs of a few MB, mounted in a private mount
namespace (``unshare``; skipped where it cannot be mounted). Sync saves, async thread saves and
weights-only exports are tested in this process; ``async_with_pinned_mem`` (a checkpoint process),
the one-line error of train.py and the real tmpfs through train.py in a child process.
"""

import errno
import json
import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.stateful import Stateful

from tests.helpers.full_disk import checkpoint_hashes, full_disk
from tests.helpers.runs import tiny_overrides
from torchtitan.components.checkpoint import CheckpointManager, ModelState, OptimizerState
from torchtitan.components.save_errors import CheckpointWriteError
from torchtitan.components.weight_conversion import load_hf_checkpoint, save_hf_checkpoint
from torchtitan.config.job_config import Checkpoint
from torchtitan.models.llama import Transformer, build_model_args

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "tests" / "helpers" / "full_disk.py"


def tiny_args():
    return build_model_args("debugmodel_tiny", vocab_size=256, max_seq_len=32, n_layers=1)


@dataclass
class Steps(Stateful):
    step: int = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, sd):
        self.step = sd["step"]


def tiny_states() -> dict:
    torch.manual_seed(0)
    model = Transformer(tiny_args())
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    optimizer.step()  # the optimizer state exists: a save writes ~3x the model
    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "train_state": Steps()}


@pytest.fixture
def manager(tmp_path, request):
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    cfg = {"enable": True, "async_mode": "disabled", **getattr(request, "param", {})}
    mgr = CheckpointManager(Checkpoint(**cfg), str(tmp_path), tiny_states())
    yield mgr
    mgr.close()


def save_and_wait(mgr: CheckpointManager, step: int, final: bool = False) -> None:
    mgr.states["train_state"].step = step
    mgr.save(step, final=final)
    mgr.close()  # async modes: the error surfaces here, as at the next save or the end of training


@pytest.mark.parametrize("manager", [dict(async_mode="disabled"), dict(async_mode="async", keep_latest_k=2)],
                         indirect=True, ids=["sync", "async"])
def test_enospc_mid_save_removes_the_partial_save_and_keeps_the_previous(manager, tmp_path):
    folder = tmp_path / "checkpoint"
    save_and_wait(manager, 1)
    before = checkpoint_hashes(folder)
    with full_disk(20_000, only="step-2.tmp"), pytest.raises(CheckpointWriteError) as err:
        save_and_wait(manager, 2)
    message = str(err.value)
    assert message.startswith(f"saving checkpoint step-2 to {folder / 'step-2.tmp'} failed: "
                                                       f"no space left on the device (it needs about ")
    needed = size_in(message, "needs about ")
    assert abs(needed - folder_size(folder / "step-1")) < 0.1 * needed  # the state's bytes ~ a checkpoint's
    assert abs(size_in(message, ", ") - shutil.disk_usage(folder).free) < 0.01 * shutil.disk_usage(folder).free
    assert "The partial step-2.tmp was removed; the previous checkpoint step-1 is intact" in message
    assert f"checkpoint.keep_latest_k={manager.cfg.keep_latest_k}" in message and "job.dump_folder" in message
    assert sorted(p.name for p in folder.iterdir()) == ["step-1"]  # removed at once, nothing else touched
    assert checkpoint_hashes(folder) == before
    save_and_wait(manager, 3)  # space again: saving works, and the newest complete one loads
    assert manager.complete_steps() == [1, 3]
    assert manager.load() == 3


def size_in(message: str, before: str) -> float:
    """The size written as '<number> <unit>' right after ``before`` (the first match)."""
    number, unit = message.split(before, 1)[1].split()[:2]
    return float(number) * {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}[unit.rstrip(",;")]


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_an_io_error_is_reported_as_such(manager, tmp_path, monkeypatch):
    from torch.distributed.checkpoint.filesystem import FileSystem

    save_and_wait(manager, 1)
    original = FileSystem.create_stream

    def failing(self, path, mode):
        if "step-2.tmp" in str(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return original(self, path, mode)

    monkeypatch.setattr(FileSystem, "create_stream", failing)
    with pytest.raises(CheckpointWriteError, match=r"(?s)failed with an I/O error \(.*Input/output error"):
        save_and_wait(manager, 2)
    assert manager.complete_steps() == [1] and not (tmp_path / "checkpoint" / "step-2.tmp").exists()


@pytest.mark.parametrize("manager", [dict(model_weights_only=True, export_dtype="bfloat16")], indirect=True)
def test_weights_only_export_on_a_full_disk(manager, tmp_path):
    save_and_wait(manager, 1)
    with full_disk(1000, only="step-2.tmp"), pytest.raises(CheckpointWriteError) as err:
        save_and_wait(manager, 2, final=True)
    model_bytes = sum(v.numel() * 2 for v in manager.states["model"].state_dict().values())
    assert f"needs about {model_bytes / 1024:.1f} KiB" in str(err.value)  # bf16 weights, no optimizer
    assert manager.complete_steps() == [1] and not (tmp_path / "checkpoint" / "step-2.tmp").exists()


def test_unfinished_saves_are_cleaned_at_start_up(manager, tmp_path):
    folder = tmp_path / "checkpoint"
    save_and_wait(manager, 1)
    save_and_wait(manager, 2)
    before = checkpoint_hashes(folder)
    os.replace(folder / "step-2", folder / "step-2.tmp")  # finished by DCP, stopped before the rename
    shutil.copytree(folder / "step-1", folder / "step-3.tmp")
    (folder / "step-3.tmp" / ".metadata").unlink()  # a save that did not finish
    assert checkpoint_hashes(folder).keys() == {k for k in before if k.startswith("step-1/")}
    assert manager.load() == 2  # step-2 published, step-3.tmp removed, both with a warning
    assert sorted(p.name for p in folder.iterdir()) == ["step-1", "step-2"]
    assert checkpoint_hashes(folder) == before


# ---- Hugging Face export ----------------------------------------------------------------------------
def test_hf_export_on_a_full_disk_leaves_the_earlier_export(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    states = tiny_states()
    model = states["model"].parts[0]
    sd = {k: v for k, v in model.state_dict().items() if k != "freqs_cis"}
    out = tmp_path / "hf"
    save_hf_checkpoint(sd, model.model_args, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):  # what safetensors raises on a full disk (measured)
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointWriteError) as err:
        save_hf_checkpoint({k: v * 2 for k, v in sd.items()}, model.model_args, out)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    nbytes = sum(v.numel() * 4 for v in sd.values())
    assert f"exporting the model in Hugging Face format to {out} failed: no space left on the device (it needs " \
           f"about {nbytes / 1024:.1f} KiB" in str(err.value)
    assert f"The partial export was removed; {out} is as it was" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not (tmp_path / "hf.tmp").exists()
    loaded, _ = load_hf_checkpoint(out)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)



# ---- through train.py: one line, exit 1, nothing lost ----------------------------------------------
def train_args(dump: Path, cache: Path, *extra: str) -> list[str]:
    """4 steps of a 1-layer model (a checkpoint of ~7.2 MiB), saves at steps 2 and 4."""
    return [*tiny_overrides(dump, cache, 4), "--model.n_layers", "1", "--training.seq_len", "32",
            "--training.global_batch_size", "2", "--checkpoint.enable", "--checkpoint.interval", "2", *extra]


def run_train(args: list[str], hooks: list[str] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(RUNNER), *hooks, "--", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


def assert_one_line_full_disk_error(proc: subprocess.CompletedProcess, folder: Path) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # A long message keeps a short error: line and continues indented below it (tools/cli.py).
    block = [lines[errors[0]]]
    for line in lines[errors[0] + 1:]:
        if not line.startswith("  "):
            break
        block.append(line.strip())
    assert block[0].endswith("free there)"), block  # the problem alone on the first line
    line = " ".join(block)
    assert line.startswith(f"error: CheckpointWriteError: saving checkpoint step-4 to {folder / 'step-4.tmp'} "
                           f"failed: no space left on the device (it needs about "), line
    assert "The partial step-4.tmp was removed; the previous checkpoint step-2 is intact" in line
    return line


@pytest.mark.parametrize("mode", ["disabled", "async", "async_with_pinned_mem"])
def test_train_reports_an_injected_full_disk_in_one_line(tmp_path, cache_dir, mode):
    dump, record = tmp_path / "run", tmp_path / "before.json"
    proc = run_train(train_args(dump, cache_dir, "--checkpoint.async_mode", mode),
                     hooks=["--enospc-at-step", "4", "100000", "--record-checkpoints", str(record)])
    folder = dump / "checkpoint"
    assert_one_line_full_disk_error(proc, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["step-2"]
    assert checkpoint_hashes(folder) == json.loads(record.read_text())  # as before the failed save
    assert not (dump / "run.lock").exists()  # released on the error path too


def _private_mount_prefix(probe: Path) -> list[str] | None:
    """A command prefix that runs its command in a private mount namespace where it may mount a
    tmpfs (root: ``unshare --mount``; others: also a user namespace), or None."""
    if shutil.which("unshare") is None:
        return None
    probe.mkdir()
    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        test = subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs '{probe}'"],
                              capture_output=True, timeout=30)
        if test.returncode == 0:
            return prefix
    return None


def test_a_real_small_file_system_fills_up(tmp_path, cache_dir):
    """A tmpfs of 11 MiB holds one checkpoint of 7.2 MiB, not two: the second save fails, and a
    rerun whose final save is weights-only (2.4 MiB) resumes from the first and fits."""
    prefix = _private_mount_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs `unshare --mount` as root, or unprivileged user namespaces)")
    dump, record = tmp_path / "run", tmp_path / "before.json"
    folder = dump / "checkpoint"
    folder.mkdir(parents=True)
    copy = tmp_path / "after"  # the tmpfs lives as long as its namespace: copy it out
    script = "; ".join([
        f"mount -t tmpfs -o size=11m tmpfs '{folder}' || exit 1",
        f"\"$@\" 2> '{tmp_path}/first.err'",  # "$@": the training command
        f"cp -a '{folder}' '{copy}-1'; cp '{record}' '{record}-1'",
        f"\"$@\" --checkpoint.model_weights_only 2> '{tmp_path}/second.err'",
        f"cp -a '{folder}' '{copy}-2'",
    ])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run([*prefix, "sh", "-c", script, "sh", sys.executable, str(RUNNER), "--record-checkpoints",
                    str(record), "--", *train_args(dump, cache_dir)], env=env, timeout=600, cwd=REPO, check=True)
    first = subprocess.CompletedProcess([], 1, "", (tmp_path / "first.err").read_text())
    line = assert_one_line_full_disk_error(first, folder)
    needed, free = size_in(line, "needs about "), size_in(line, "MiB, ")
    assert 7 * 2**20 < needed < 7.5 * 2**20 and free < needed, line  # the real numbers of the tmpfs
    assert sorted(p.name for p in (tmp_path / "after-1").iterdir()) == ["step-2"]
    second = (tmp_path / "second.err").read_text()
    assert "error:" not in second and f"loading checkpoint {folder / 'step-2'}" in second, second[-3000:]
    assert sorted(p.name for p in (tmp_path / "after-2").iterdir()) == ["step-2", "step-4"]
    before = json.loads(Path(f"{record}-1").read_text())  # as the failed save started
    assert before.keys() == {k for k in checkpoint_hashes(tmp_path / "after-2") if k.startswith("step-2/")}
    assert checkpoint_hashes(tmp_path / "after-1") == before
    assert {k: v for k, v in checkpoint_hashes(tmp_path / "after-2").items() if k in before} == before

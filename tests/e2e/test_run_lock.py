"""One live run per dump folder: ``<dump_folder>/run.lock``.

In this process: who owns a lock, which owners count as dead (pid gone or recycled, an earlier
attempt of the same job, a heartbeat too old on another host) and which as alive, the heartbeat,
and a race of several processes starting at once. Through train.py: a second run is refused on
every rank, naming the owner, touching nothing; a SIGKILLed run's lock is taken over by the rerun,
which resumes from its checkpoint.
"""

import json
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.runs import tiny_overrides, torchrun
from torchtitan.components.run_lock import LOCK_FILE, Owner, RunLock, RunLockError, _proc_stat, take_run_lock

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def warnings_logged():
    """The torchtitan logger's warnings (it may not propagate to pytest's caplog)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("torchtitan")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


@pytest.fixture
def lock(tmp_path):
    held = RunLock(tmp_path, timeout_s=60)
    yield held
    held.release()


def write_lock(folder: Path, **fields) -> bytes:
    """A lock file as another run would have written it; returns its bytes."""
    now = time.time()
    owner = Owner(**{"host": socket.gethostname(), "pid": os.getpid(), "start_time": now - 600,
                     "heartbeat": now, **fields})
    raw = json.dumps(owner.__dict__).encode()
    (folder / LOCK_FILE).write_bytes(raw)
    return raw


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid is free
    return child.pid


@pytest.fixture
def live_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def test_the_lock_names_its_owner_and_is_released(lock, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lock.acquire()
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    assert owner["job_id"] == "slurm:4242" and owner["attempt"] == "1.0"
    assert abs(owner["start_time"] - time.time()) < 60 and owner["heartbeat"] >= owner["start_time"]
    assert owner["process_start"] == _proc_stat(os.getpid())[1]
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    assert sorted(os.listdir(tmp_path)) == []  # no temporary files left either


def test_a_live_owner_on_this_host_is_refused_naming_it(lock, tmp_path, live_process):
    raw = write_lock(tmp_path, pid=live_process.pid, process_start=_proc_stat(live_process.pid)[1],
                     job_id="slurm:77")
    with pytest.raises(RunLockError) as err:
        lock.acquire()
    message = str(err.value)
    assert f"job.dump_folder={str(tmp_path)!r} is in use by another run (host {socket.gethostname()}, " \
           f"pid {live_process.pid}, job slurm:77, started " in message and "(10 min ago)" in message
    assert f"delete {tmp_path / LOCK_FILE}" in message and "\n" not in message
    assert (tmp_path / LOCK_FILE).read_bytes() == raw  # untouched
    lock.release()  # never removes a lock it does not hold
    assert (tmp_path / LOCK_FILE).read_bytes() == raw


@pytest.mark.parametrize("case", ["pid gone", "pid recycled", "own pid", "other host, heartbeat too old",
                                  "other host, earlier attempt of this job", "unreadable"])
def test_a_dead_owners_lock_is_taken_over_with_a_warning(lock, tmp_path, case, monkeypatch, warnings_logged):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    fields = {
        "pid gone": dict(pid=dead_pid()),
        "pid recycled": dict(pid=os.getppid(), process_start=-1),  # alive, but not the process that locked
        "own pid": dict(),  # this process locked it earlier and never released it
        "other host, heartbeat too old": dict(host="elsewhere", heartbeat=time.time() - 61),
        "other host, earlier attempt of this job": dict(host="elsewhere", job_id="slurm:9", attempt="0.0"),
    }
    if case == "unreadable":
        (tmp_path / LOCK_FILE).write_text("{not json")
    else:
        write_lock(tmp_path, **fields[case])
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.owner.token
    [warning] = [r.getMessage() for r in warnings_logged]
    assert warning.startswith(f"taking over {tmp_path / LOCK_FILE}: ")


@pytest.mark.parametrize("case", ["other host, fresh heartbeat", "other host, same attempt of this job"])
def test_a_live_owner_on_another_host_is_refused(lock, tmp_path, case, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
    job = dict(job_id="slurm:9", attempt="0.0") if "same attempt" in case else dict(job_id="slurm:8")
    raw = write_lock(tmp_path, host="elsewhere", heartbeat=time.time() - 30, **job)
    with pytest.raises(RunLockError, match="in use by another run \\(host elsewhere, .* last heartbeat 3[0-9] s ago"):
        lock.acquire()
    assert (tmp_path / LOCK_FILE).read_bytes() == raw


def test_the_heartbeat_is_refreshed_while_held(tmp_path):
    held = RunLock(tmp_path, timeout_s=1)  # refreshed every 0.5 s
    held.acquire()
    try:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        time.sleep(1.5)
        later = json.loads((tmp_path / LOCK_FILE).read_text())
        assert later["heartbeat"] > first + 0.4 and later["token"] == held.owner.token
        # Seen from another host, the owner is alive: started 1.5 s ago, over the timeout, but beating.
        seen_from_elsewhere = Owner(**{**later, "host": "elsewhere"})
        assert RunLock(tmp_path, timeout_s=1)._why_dead(seen_from_elsewhere, Owner.me()) is None
    finally:
        held.release()


def _contend(folder: str, start: float, held, results) -> None:
    lock = RunLock(folder, timeout_s=60)
    time.sleep(max(0.0, start - time.time()))
    try:
        lock.acquire()
        results.put("took")
        held.wait(30)  # keep it while the others try
    except RunLockError:
        results.put("refused")


def test_of_runs_starting_together_exactly_one_takes_the_lock(tmp_path):
    write_lock(tmp_path, pid=dead_pid())  # all of them also race to take over a dead owner's lock
    ctx = multiprocessing.get_context("fork")
    held, results = ctx.Event(), ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, held, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = sorted(results.get(timeout=60) for _ in procs)
    held.set()
    for p in procs:
        p.join(30)
    assert outcomes == ["refused"] * 5 + ["took"]


def test_take_run_lock_checks_its_config(tmp_path):
    assert take_run_lock(str(tmp_path), enabled=False, timeout_s=300) is None
    assert not (tmp_path / LOCK_FILE).exists()
    with pytest.raises(RunLockError, match="job.lock_timeout_seconds must be > 0, got 0"):
        take_run_lock(str(tmp_path), enabled=True, timeout_s=0)


# ---- through train.py --------------------------------------------------------------------------------
def train_args(dump: Path, cache: Path, *extra: str) -> list[str]:
    return [*tiny_overrides(dump, cache, 4), "--model.n_layers", "1", "--training.seq_len", "32",
            "--training.global_batch_size", "2", "--checkpoint.enable", "--checkpoint.interval", "2", *extra]


def test_a_second_live_run_is_refused_on_every_rank_and_touches_nothing(tmp_path, cache_dir, lock):
    lock.acquire()  # this test process is the live run that holds the folder
    (tmp_path / "checkpoint" / "step-2").mkdir(parents=True)
    (tmp_path / "checkpoint" / "step-2" / "weights").write_bytes(b"previous checkpoint")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    proc = torchrun(2, train_args(tmp_path, cache_dir), check=False, timeout=300)
    assert proc.returncode != 0
    for rank in (0, 1):
        lines = [x for x in proc.stderr.splitlines() if x.startswith(f"[rank{rank}] error: RunLockError:")]
        assert len(lines) == 1, proc.stderr[-4000:]
        assert f"is in use by another run (host {socket.gethostname()}, pid {os.getpid()}," in lines[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # no metrics, no config
    assert (tmp_path / "checkpoint" / "step-2" / "weights").read_bytes() == b"previous checkpoint"
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.owner.token  # still ours


def test_a_killed_runs_lock_is_taken_over_and_the_rerun_resumes(tmp_path, cache_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    runner = [sys.executable, str(REPO / "tests" / "helpers" / "train_runner.py")]
    killed = subprocess.run([*runner, "--kill-rank-at-step", "0", "4", "--", *train_args(tmp_path, cache_dir)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    owner = json.loads((tmp_path / LOCK_FILE).read_text())  # left behind by the SIGKILL
    step2 = {p.name: p.read_bytes() for p in (tmp_path / "checkpoint" / "step-2").iterdir()}
    rerun = subprocess.run([sys.executable, str(REPO / "train.py"), *train_args(tmp_path, cache_dir)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"taking over {tmp_path / LOCK_FILE}: its owner is gone (host {owner['host']}, pid {owner['pid']}" \
           in rerun.stderr
    assert f"loading checkpoint {tmp_path / 'checkpoint' / 'step-2'}" in rerun.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint" / "step-2").iterdir()} == step2
    assert sorted(p.name for p in (tmp_path / "checkpoint").iterdir()) == ["step-2", "step-4"]
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end: the next run starts freely

"""One live run per dump folder: ``<job.dump_folder>/run.lock``.

Global rank 0 takes the lock at start-up, before anything is written into the folder, and every
rank follows its decision: a refused run exits on every rank with one line naming the owner. The
file holds its owner as JSON (host, pid, start time, job id, heartbeat); a daemon thread of rank 0
refreshes the heartbeat every tenth of ``job.lock_timeout_seconds``.

A lock is taken over, with a warning, when its owner is dead:
  - same host: its pid is gone, a zombie, or now another process (the recorded start differs);
  - another host: it is an earlier attempt of this job (a Slurm requeue or torchrun restart: same
    job id, other restart count), or its heartbeat is older than ``job.lock_timeout_seconds``.
Otherwise the run is refused. Creation is atomic on a file system shared by several nodes (NFS
included): a complete temporary file is hard-linked to the lock's name, which fails when the name
exists, so of two runs starting together one wins. A take-over first renames the dead owner's file
aside (one renamer wins) and checks it renamed the file it judged.

Released by ``Trainer.close``, by train.py's error exit and at interpreter exit; a SIGKILLed run
leaves its lock behind, which the dead-owner rules cover. A start that fails before it is accepted
(components/run_folder.py) releases it at once, and train.py then removes the dump folder if this
start created it and nothing else is in it.
"""

import atexit
import errno
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import torch.distributed as dist

from torchtitan.tools.logging import logger

LOCK_FILE = "run.lock"
_HELD: list["RunLock"] = []  # released at exit, also on paths that skip Trainer.close


class RunLockError(ValueError):
    """The dump folder is in use by another live run (or its lock cannot be written): a user error."""


def _job_id() -> str:
    """The scheduler's id of this job, the same in every attempt of it ('' outside Slurm/torchrun)."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return f"torchrun:{run_id}" if run_id != "none" else ""  # torchrun's default id is "none" for every job


def _attempt() -> str:
    return f"{os.environ.get('SLURM_RESTART_COUNT', '0')}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc, or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name in (...) may hold spaces
    return fields[0], int(fields[19])


@dataclass
class Owner:
    host: str
    pid: int
    start_time: float  # when it took the lock (Unix time)
    heartbeat: float
    job_id: str = ""
    attempt: str = ""
    process_start: int | None = None  # /proc start ticks: a recycled pid is another process
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # this acquisition

    @classmethod
    def me(cls) -> "Owner":
        now, stat = time.time(), _proc_stat(os.getpid())
        return cls(socket.gethostname(), os.getpid(), now, now, _job_id(), _attempt(),
                   stat[1] if stat else None)

    @classmethod
    def from_json(cls, raw: bytes) -> "Owner":
        """Keys of a later version are ignored; a missing one is an error (TypeError)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(raw).items() if k in known})

    def describe(self) -> str:
        now = time.time()
        started = datetime.fromtimestamp(self.start_time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        job = f", job {self.job_id}" if self.job_id else ""
        return (f"host {self.host}, pid {self.pid}{job}, started {started} ({_ago(now - self.start_time)}), "
                f"last heartbeat {_ago(now - self.heartbeat)}")


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds} s ago" if seconds < 120 else f"{seconds // 60} min ago"


def _pid_alive(pid: int, process_start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is None:  # no /proc (macOS): the pid exists
        return True
    state, start = stat
    return state not in ("Z", "X") and (process_start is None or start == process_start)


class RunLock:
    """``<folder>/run.lock``, held by this process between ``acquire`` and ``release``."""

    def __init__(self, folder: str | Path, timeout_s: float):
        self.path = Path(folder) / LOCK_FILE
        self.timeout_s = timeout_s
        self.owner: Owner | None = None  # this process, while it holds the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Take the lock, taking over a dead owner's; raise RunLockError if a live run holds it."""
        me = Owner.me()
        for _ in range(10):  # each round: one other run created, or moved aside, the file meanwhile
            if self._create(me):
                self.owner = me
                _HELD.append(self)
                self._start_heartbeat()
                return
            raw, other = self._read()
            if raw is None:  # released meanwhile
                continue
            dead = self._why_dead(other, me)
            if dead is None:
                raise RunLockError(
                    f"job.dump_folder={str(self.path.parent)!r} is in use by another run ({other.describe()}; "
                    f"lock {self.path}): wait for it to end or stop it, or pass another --job.dump_folder. If "
                    f"that run is dead, delete {self.path} (a lock whose heartbeat is older than "
                    f"job.lock_timeout_seconds={self.timeout_s:g} is taken over by itself)"
                )
            if self._move_aside(raw):
                logger.warning(f"taking over {self.path}: {dead}")
        raise RunLockError(f"could not take {self.path}: other runs kept creating and removing it")

    def _why_dead(self, other: Owner | None, me: Owner) -> str | None:
        """Why the lock's owner is dead (so the lock may be taken over), or None if it may be alive."""
        if other is None:
            return "it does not hold a readable owner (not written by a run of this version?)"
        if other.host == me.host:
            if other.pid == me.pid:
                return f"this process took it earlier and did not release it ({other.describe()})"
            if _pid_alive(other.pid, other.process_start):
                return None
            return f"its owner is gone ({other.describe()})"
        if other.job_id and other.job_id == me.job_id and other.attempt != me.attempt:
            return f"it is an earlier attempt of this job, restarted or requeued ({other.describe()})"
        if time.time() - other.heartbeat > self.timeout_s:
            return (f"its owner on another host stopped refreshing it over job.lock_timeout_seconds="
                    f"{self.timeout_s:g} ({other.describe()})")
        return None

    def _create(self, me: Owner) -> bool:
        """Create the lock with ``me`` in it, complete, or return False if it exists."""
        tmp = self.path.with_name(f".{LOCK_FILE}.{me.token}")
        try:
            tmp.write_text(json.dumps(asdict(me)))
            try:
                os.link(tmp, self.path)  # atomic, complete, fails if the name exists (NFS too)
                return True
            except FileExistsError:
                return False
            except OSError as e:
                if tmp.stat().st_nlink == 2:  # NFS: the link was made but its reply was lost
                    return True
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
            return self._create_exclusive(me)  # a file system without hard links
        except OSError as e:
            raise RunLockError(f"could not write the run lock {self.path}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, me: Owner) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:  # readers retry while it is still empty (_read)
            f.write(json.dumps(asdict(me)))
        return True

    def _read(self) -> tuple[bytes | None, Owner | None]:
        """The lock's bytes and owner; (None, None) if there is no lock, (bytes, None) if unreadable."""
        raw = b""
        for _ in range(5):  # an O_EXCL-created lock may be empty for a moment
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None, None
            try:
                return raw, Owner.from_json(raw)
            except (ValueError, TypeError, AttributeError):  # not JSON, not an object, a key missing
                time.sleep(0.1)
        return raw, None

    def _move_aside(self, raw: bytes) -> bool:
        """Remove the dead owner's lock, if it is still the file judged dead."""
        aside = self.path.with_name(f".{LOCK_FILE}.stale.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)  # of several runs taking over, one renames it
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() == raw:
                return True
            try:  # replaced meanwhile by a live run, or refreshed by its owner: put it back
                os.link(aside, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            aside.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        interval = max(0.5, self.timeout_s / 10)
        self._thread = threading.Thread(target=self._beat, args=(interval,), name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        me = self.owner
        while not self._stop.wait(interval):
            try:
                _, current = self._read()
                if current is None or current.token != me.token:
                    holder = current.describe() if current else "no owner now"
                    logger.error(f"{self.path} was taken over ({holder}): this run's heartbeat had stopped for "
                                 f"job.lock_timeout_seconds; another run may now write into this dump folder")
                    return
                me.heartbeat = time.time()
                tmp = self.path.with_name(f".{LOCK_FILE}.{me.token}")
                tmp.write_text(json.dumps(asdict(me)))
                os.replace(tmp, self.path)  # readers see the old or the new owner record, never half
            except OSError as e:  # e.g. a network file system hiccup: try again next time
                logger.warning(f"could not refresh the heartbeat of {self.path}: {e}")

    def release(self) -> None:
        """Remove the lock if this process holds it (idempotent; never another run's lock)."""
        if self.owner is None or self.owner.pid != os.getpid():  # a forked child does not own it
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            _, current = self._read()
            if current is not None and current.token == self.owner.token:
                self.path.unlink()
        except OSError as e:
            logger.warning(f"could not remove {self.path}: {e}; the next run takes it over (its owner is gone)")
        self.owner = None
        if self in _HELD:
            _HELD.remove(self)


def release_all() -> None:
    """Release every lock this process holds (train.py's error exit, which skips atexit)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)


def take_run_lock(folder: str, enabled: bool, timeout_s: float) -> RunLock | None:
    """Collective: global rank 0 takes the lock of ``folder``; every rank raises the same
    RunLockError if it is refused. Returns the lock on rank 0 (None elsewhere, or when disabled)."""
    if timeout_s <= 0:
        raise RunLockError(f"job.lock_timeout_seconds must be > 0, got {timeout_s:g}")
    if not enabled:
        return None
    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, refusal, failure = RunLock(folder, timeout_s), None, None
    if rank == 0:
        try:
            lock.acquire()
        except Exception as e:  # whatever it is, the other ranks must hear of it, not wait forever
            failure = e
            refusal = str(e) if isinstance(e, RunLockError) else f"could not take {lock.path}: {type(e).__name__}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refusal]
        dist.broadcast_object_list(box, src=0)
        refusal = box[0]
    if refusal is not None:
        raise RunLockError(refusal) from failure
    return lock if rank == 0 else None

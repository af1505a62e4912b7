"""A save that cannot be written (full disk, quota, I/O error) ends in one clear line.

DCP reports a full disk as ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
pos 704 vs 598`` (torch.save's zip writer notices the short write), with the ``OSError(ENOSPC)`` only
in ``__context__``, and lost altogether when the error crosses from DCP's checkpoint process. So a
failure is called a full disk when an ENOSPC/EDQUOT error is anywhere in its chain, or when the
folder has less free space than the save needs; the message always says both numbers.

``SaveStreamWriter`` keeps the ``OSError`` itself as the error of a failed DCP write: its errno
survives the trip from the checkpoint process (async_with_pinned_mem) to the trainer.
"""

import errno
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# The same, as text: safetensors (Rust) and pickled errors keep only the message.
_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")


class CheckpointWriteError(ValueError):
    """A checkpoint or export could not be written: the user frees space or moves the folder.

    A ValueError, so train.py reports it as a user error: one line, exit code 1.
    """


class _FirstLineOfDCPFailures(logging.Filter):
    """DCP's checkpoint process logs a failed save with every rank's traceback (~25 lines) before
    sending it to the trainer, which reports it in one line: keep the first line of that log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.pathname.endswith("_async_process_executor.py"):
            record.msg, record.args = record.getMessage().splitlines()[0], ()
        return True


class SaveStreamWriter(dcp.FileSystemWriter):
    """DCP's file system writer whose failures raise the underlying ``OSError`` (errno kept)."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as e:
            root = logging.getLogger()  # DCP's checkpoint process logs on the root logger
            if not any(isinstance(f, _FirstLineOfDCPFailures) for f in root.filters):
                root.addFilter(_FirstLineOfDCPFailures())
            os_error = next((c for c in causes(e) if isinstance(c, OSError) and c.errno), None)
            if os_error is None or os_error is e:
                raise
            raise OSError(os_error.errno, os_error.strerror, os_error.filename) from e


def causes(e: BaseException):
    """``e``, the per-rank errors of a CheckpointException, and their ``__cause__``/``__context__``."""
    seen, todo = set(), [e]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        yield c
        if isinstance(c, CheckpointException):
            todo += [inner for inner, _ in c.failures.values()]
        todo += [c.__cause__, c.__context__]


def is_disk_full(e: BaseException, needed: int, free: int) -> bool:
    for c in causes(e):
        if isinstance(c, OSError) and c.errno in _FULL_ERRNOS:
            return True
        if any(text in str(c).lower() for text in _FULL_TEXTS):
            return True
    return needed > free


def state_bytes(obj) -> int:
    """Bytes a save of this (nested) state writes: a DTensor's global size (each shard written once),
    a plain tensor's size (replicas are deduplicated by DCP), bytes as they are."""
    if isinstance(obj, torch.Tensor):  # DTensor.numel() is the global count
        return obj.numel() * obj.element_size()
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # removed meanwhile
                pass
    return total


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system holding ``path`` or its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def first_line(e: BaseException) -> str:
    """The first line of an error's message; for DCP's CheckpointException, the first rank's error's."""
    if isinstance(e, CheckpointException) and e.failures:
        rank, (inner, _) = next(iter(e.failures.items()))
        return f"on rank {rank}: {type(inner).__name__}: {first_line(inner)}"
    text = str(e).strip().splitlines()
    if text:
        return text[0][:500]
    return "a file ends early (truncated?)" if isinstance(e, EOFError) else "(no message)"


def write_failed(what: str, target: Path, error: BaseException, needed: int, outcome: str,
                 room: str) -> CheckpointWriteError:
    """The error of a failed write of ``needed`` bytes to ``target``.

    ``outcome`` says what was cleaned up and what survived (e.g. the previous checkpoint); ``room``
    how to make room on a full disk.
    """
    free = free_bytes(target)
    sizes = f"it needs about {human(needed)}, {human(free)} free there"
    cause = f"{type(error).__name__}: {first_line(error)}"
    # The problem on the first line, then what survived and the fix, then the cause: a terminal's
    # wrap of one long line hides the fix (tools/cli.py prints the rest indented).
    if is_disk_full(error, needed, free):
        return CheckpointWriteError(
            f"{what} to {target} failed: no space left on the device ({sizes})\n{outcome}.\n"
            f"To go on: {room}, then rerun.\ncause: {cause}"
        )
    return CheckpointWriteError(
        f"{what} to {target} failed with an I/O error ({sizes})\n{outcome}.\nTo go on: check "
        f"that the file system is mounted and writable (dmesg may name a failing disk or network mount), "
        f"then rerun.\ncause: {cause}"
    )

"""torchrun with one clear report per failure instead of torchelastic's traceback.

    python -m torchtitan.tools.launch <torchrun options> train.py <train.py options>

Same options and behaviour as ``torchrun`` (``torch.distributed.run.parse_args`` and ``run``),
except how a failed run ends. torchrun's ``main`` is decorated with ``@record``: every failure
ends in ~30 lines of the launcher's own traceback and a ``ChildFailedError`` table that bury the
line that matters. Here the ``ChildFailedError`` is caught and summarized:

- a user error (train.py printed its one ``error: ...`` line and exited 1): that line is not
  repeated when the rank's output is on the console, only ``rank R exited with code 1``;
  for a rank filtered out by ``--local-ranks-filter`` its line is printed from its error file;
- a crash (an uncaught exception): the root-cause traceback from the rank's torchelastic error
  file (``TORCHELASTIC_ERROR_FILE``), or one pointer line when the rank printed it itself;
- a death by signal (SIGSEGV, SIGKILL of the OOM killer, ...): the signal, and the Python stack
  at the fault when faulthandler could write one.

The launcher exits with the failed rank's exit code (128 + N for signal N, as a shell does).

Around that (torchtitan/tools/launch_control.py): a start line before torch is imported; train.py's
config and layout checked before any rank starts (its ``error:`` line, exit 1, no rank spawned);
Ctrl-C and SIGTERM relayed to the ranks, which save and stop (exit 130 after Ctrl-C, 0 after
SIGTERM). Each rank dies with the launcher (``die_with_launcher``).

Both sides of the error-file contract live here: the launcher reads the files, train.py writes
them through ``record_user_error`` / ``record_crash`` / ``enable_fault_log`` (stdlib only at
import: a config error must not wait for torch).
"""

from __future__ import annotations

import faulthandler
import glob
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time

from torchtitan.tools.launch_control import (
    PREFIX,
    SignalRelay,
    Stopped,
    preflight,
    signal_text,
    start_line,
    stopped_on_request,
)

# Written by ``record_user_error`` into the torchelastic error file's extraInfo.
USER_ERROR_KEY = "torchtitan_user_error"
FAULT_LOG = "faulthandler.log"  # beside the rank's error file, in the launcher's log folder
_NOT_AVAILABLE = "<N/A>"  # torchelastic's error_file when a rank wrote none
_fault_log_file = None  # kept open for the whole process: faulthandler writes to its fd


# ---- the rank's side (called by train.py) ----------------------------------------------------


def enable_fault_log() -> None:
    """Python's stack of every thread on SIGSEGV/SIGFPE/SIGABRT/SIGBUS/SIGILL.

    Under a launcher it goes to a file beside the rank's error file: a rank filtered out by
    ``--local-ranks-filter`` writes its stderr nowhere, and the launcher prints the file.
    Alone (``python train.py``) it goes to stderr.
    """
    global _fault_log_file
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    try:
        if error_file:
            _fault_log_file = open(os.path.join(os.path.dirname(error_file), FAULT_LOG), "w")
    except OSError:  # no log folder to write: stderr, as without a launcher
        _fault_log_file = None
    try:
        faulthandler.enable(_fault_log_file or sys.stderr, all_threads=True)
    except (OSError, ValueError):  # stderr without a file descriptor (captured in-process, e.g. by pytest)
        pass


def record_user_error(line: str) -> None:
    """Leave the rank's ``error:`` line in its torchelastic error file, marked as a user error.

    The format is torchelastic's (``ErrorHandler.record_exception``), so a plain ``torchrun``
    shows the line as the "traceback" of its table.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return
    info = {"py_callstack": line, "timestamp": str(int(time.time())), USER_ERROR_KEY: True}
    try:
        with open(error_file, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": info}}, f)
    except OSError:  # a report that cannot be written must not hide the error itself
        pass


def record_crash(exc: BaseException) -> None:
    """Write the traceback of ``exc`` (being handled) to the rank's torchelastic error file."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(exc)


LAUNCHER_PID_ENV = "TORCHTITAN_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_launcher() -> None:
    """Linux: the kernel SIGKILLs this rank when its parent (torchrun's agent) dies.

    Each rank runs in a session of its own (torchelastic starts it so), so a launcher killed with
    its process group (``kill -9``, the OOM killer) would leave the ranks running -- and rank 0
    refreshing the run lock's heartbeat, which refuses the restarted run. Without peers a rank
    cannot save anything useful, so SIGKILL it is; the lock of a dead pid is taken over at once.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux: no parent-death signal
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and not _alive(int(launcher)):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


# ---- the launcher's side ---------------------------------------------------------------------


class _DropFailureLog(logging.Filter):
    """torchelastic logs each failure (and the SIGTERM sent to the other ranks) before raising;
    the summary below says the same in fewer lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("failed (exitcode", "Sending process"))


def main(argv: list[str] | None = None) -> int:
    """torchrun's ``run`` on torchrun's arguments; returns the exit code (0, or the failed rank's)."""
    relay = SignalRelay()  # from the first instant: Ctrl-C is one line, never a traceback
    try:
        return _launch(sys.argv[1:] if argv is None else argv, relay)
    except Stopped as e:
        _say(f"stopped by {signal_text(e.signum)} before any rank had started")
        return 128 + e.signum
    finally:
        relay.restore()


def _launch(argv: list[str], relay: SignalRelay) -> int:
    if "--help" not in argv and "-h" not in argv:
        _say(start_line(argv))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        for line in preflight(args):  # before any rank exists: a config or layout error costs ~2 s, not ~10
            _say(line)
    except ValueError as e:
        if os.environ.get("TORCHTITAN_TRACEBACK", "") not in ("", "0"):
            raise
        from torchtitan.tools.cli import error_line

        print(error_line(e), file=sys.stderr, flush=True)
        return 1
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks' check that their launcher lives
    relay.take_over_from_torchrun(args)
    own_log_dir = not args.log_dir
    if own_log_dir:  # a known place to look for the ranks' fault logs; removed at the end
        args.log_dir = tempfile.mkdtemp(prefix="torchtitan_launch_")
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropFailureLog())
    try:
        run(args)
        return relay.exit_code()
    except ChildFailedError as e:
        if relay.signum is not None and all(stopped_on_request(f) for f in e.failures.values()):
            return relay.exit_code(ranks_failed=True)
        return report(e.failures, _shown_local_ranks(args.local_ranks_filter), args.log_dir)
    except SignalException as e:
        _say(f"stopped by {e.sigval.name}; the ranks were sent {e.sigval.name} too")
        return 128 + int(e.sigval)
    except RendezvousError as e:
        _say(f"rendezvous {args.rdzv_backend} at {args.rdzv_endpoint or '(none)'} failed: {type(e).__name__}: "
             f"{e}. Start every node with the same --rdzv_endpoint and --rdzv_id, and check it can reach that "
             f"host and port")
        return 1
    finally:
        if own_log_dir:
            shutil.rmtree(args.log_dir, ignore_errors=True)


def report(failures: dict, shown: set[int] | None, log_dir: str) -> int:
    """Print the summary of the failed ranks (global rank -> ProcessFailure); return the exit code."""
    rank = root_cause(failures, shown, log_dir)
    failure = failures[rank]
    user_line = _user_error_line(failure)
    visible = shown is None or failure.local_rank in shown
    if user_line is not None:
        if not visible:  # its output went nowhere: this is the only place the line appears
            print(user_line, file=sys.stderr)
        _say(f"rank {rank} exited with code {failure.exitcode}")
    elif failure.exitcode < 0:
        _report_signal(rank, failure, log_dir)
    else:
        _report_crash(rank, failure, visible)
    others = [f"rank {r} ({_one_line(f, user_line)})" for r, f in sorted(failures.items()) if r != rank]
    if others:
        _say(f"also failed: {'; '.join(others)}")
    _forward_error_file(failure)
    return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode


def root_cause(failures: dict, shown: set[int] | None, log_dir: str = "") -> int:
    """The global rank whose failure to report.

    A user error is a root cause wherever it appears (each rank checks its own inputs; no peer's
    failure causes one): one of those, preferably one already on the console. Otherwise not a
    rank that died of SIGTERM (the launcher stops the other ranks that way), and among the
    failures within a few seconds of the first one, the kind that is a cause rather than a
    consequence: a native fault, then SIGKILL (the OOM killer), then an uncaught exception (a
    peer of a dead rank raises "connection closed" on its next collective), then an exit code.
    Times: the mtime of the error file or faulthandler log, else when the launcher saw the exit.
    torchelastic's own ``get_first_failure`` orders by whole seconds and breaks ties by rank.
    """
    users = [r for r, f in failures.items() if _user_error_line(f) is not None]
    if users:
        on_console = [r for r in users if shown is None or failures[r].local_rank in shown]
        return min(on_console or users)
    candidates = [r for r, f in failures.items() if f.signal_name() != "SIGTERM"] or list(failures)
    seen = {r: _when_and_kind(failures[r], log_dir) for r in candidates}
    first = min(when for when, _ in seen.values())
    close = [r for r in candidates if seen[r][0] <= first + _SIMULTANEOUS_S]
    return min(close, key=lambda r: (seen[r][1], seen[r][0], r))


_SIMULTANEOUS_S = 3.0  # a gloo peer notices a dead rank within a second; detection lags by ~1 s


def _when_and_kind(failure, log_dir: str) -> tuple[float, int]:
    """(seconds since the epoch, kind: 0 native fault, 1 SIGKILL, 2 exception, 3 exit code)."""
    if failure.exitcode < 0:
        fault_log = _fault_log_path(log_dir, failure.local_rank)
        when = os.stat(fault_log).st_mtime if fault_log else failure.timestamp
        return when, 1 if failure.signal_name() == "SIGKILL" else 0
    if failure.error_file != _NOT_AVAILABLE and os.path.isfile(failure.error_file):
        return os.stat(failure.error_file).st_mtime, 2
    return failure.timestamp, 3


def _report_crash(rank: int, failure, visible: bool) -> None:
    report = _error_report(failure)
    if report is None:
        _say(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) exited with code "
             f"{failure.exitcode} without an error report; its own output is the only trace")
    elif visible:
        _say(f"rank {rank} failed with exit code {failure.exitcode}: {report[0]} (traceback above)")
    else:
        _say(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) failed with exit code "
             f"{failure.exitcode}; its traceback:")
        print(_indent(report[1]), file=sys.stderr)


def _report_signal(rank: int, failure, log_dir: str) -> None:
    name = failure.signal_name()
    hint = {
        "SIGKILL": "the kernel's out-of-memory killer (see `dmesg`), the scheduler, or a lost node",
        "SIGSEGV": "a crash in native code (a torch/CUDA/NCCL bug, or bad memory access)",
        "SIGABRT": "an abort in native code (e.g. a failed C++ check, or NCCL's watchdog)",
        "SIGBUS": "a bad memory access (often /dev/shm full in a container)",
        "SIGTERM": "stopped from outside (the launcher stops a failed run's other ranks this way)",
    }.get(name, "")
    _say(f"rank {rank} (local rank {failure.local_rank}, pid {failure.pid}) was killed by {name} "
         f"(exit code {failure.exitcode}){': ' + hint if hint else ''}")
    stack = _fault_log(log_dir, failure.local_rank)
    if stack:
        _say("Python stack at the fault (faulthandler):")
        print(_indent(stack), file=sys.stderr)


def _user_error_line(failure) -> str | None:
    message = failure.message
    if isinstance(message, dict) and message.get("extraInfo", {}).get(USER_ERROR_KEY):
        return message.get("message", "")
    return None


def _error_report(failure) -> tuple[str, str] | None:
    """(``Type: message`` line, traceback) from the rank's error file; None when it wrote none."""
    if failure.error_file == _NOT_AVAILABLE:
        return None
    if isinstance(failure.message, dict):  # ErrorHandler.record_exception's format
        text = str(failure.message.get("message", ""))
        stack = failure.message.get("extraInfo", {}).get("py_callstack") or text
    else:
        text = stack = str(failure.message)
    return (text.strip().splitlines() or ["(an empty message)"])[0], stack


def _one_line(failure, reported_user_line: str | None) -> str:
    if failure.exitcode < 0:
        return "stopped: SIGTERM" if failure.signal_name() == "SIGTERM" else f"killed by {failure.signal_name()}"
    line = _user_error_line(failure)
    if line is not None and reported_user_line is not None and _unprefixed(line) == _unprefixed(reported_user_line):
        return f"exit code {failure.exitcode}, the same error"
    report = _error_report(failure)
    return f"exit code {failure.exitcode}" + (f": {report[0]}" if report else "")


def _unprefixed(line: str) -> str:
    """The error line without train.py's ``[rankN] `` prefix."""
    return line.split("] ", 1)[1] if line.startswith("[rank") and "] " in line else line


def _fault_log_path(log_dir: str, local_rank: int) -> str:
    """The newest non-empty faulthandler log of ``local_rank`` ("" when it wrote none)."""
    pattern = os.path.join(log_dir, "*", "attempt_*", str(local_rank), FAULT_LOG)
    paths = [p for p in glob.glob(pattern) if os.path.getsize(p) > 0] if log_dir else []
    return max(paths, key=os.path.getmtime) if paths else ""


def _fault_log(log_dir: str, local_rank: int) -> str:
    path = _fault_log_path(log_dir, local_rank)
    if not path:
        return ""
    with open(path, errors="replace") as f:
        return f.read().strip()


def _forward_error_file(failure) -> None:
    """As torchrun's ``@record`` does: a launcher under another launcher (or a scheduler that reads
    TORCHELASTIC_ERROR_FILE) passes the root cause up."""
    if os.environ.get("TORCHELASTIC_ERROR_FILE") and failure.error_file != _NOT_AVAILABLE:
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().dump_error_file(failure.error_file, failure.exitcode)


def _shown_local_ranks(local_ranks_filter: str | None) -> set[int] | None:
    """Local ranks whose output reaches the console (None = all of them)."""
    if not local_ranks_filter:
        return None
    return {int(r) for r in local_ranks_filter.split(",")}


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


def _say(text: str) -> None:
    print(f"{PREFIX} {text}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())

"""One ``error: ...`` line instead of a traceback, for every entry point (train.py, scripts/).

    from torchtitan.tools.cli import main_with_user_errors

    def run(argv: list[str]) -> None:  # does the work; raises on any problem
        ...

    if __name__ == "__main__":
        main_with_user_errors(run, sys.argv[1:])

``main_with_user_errors(fn, argv)`` calls ``fn(argv)`` and returns what it returns. When it raises

- a user error (an instance of ``USER_ERRORS``: a bad value, a missing or unwritable path, ...):
  prints ``error: <Type>: <message> (set TORCHTITAN_TRACEBACK=1 for the full traceback)`` as one
  line on stderr (``[rankN] error: ...`` under a multi-rank launcher; a long or multi-line message
  keeps a short ``error:`` line, its detail indented below: ``error_line``), leaves that text in the
  rank's torchelastic error file (``torchtitan.tools.launch`` prints it from there) and exits with code 1;
- anything else (a bug, a crash): writes its traceback to the error file and re-raises it.

``TORCHTITAN_TRACEBACK=1`` re-raises user errors too, with their full traceback. A native crash
(SIGSEGV, ...) prints the Python stack (faulthandler; see ``launch.enable_fault_log``).
Stdlib only at import: a config error must not wait for torch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import textwrap
import threading
from typing import Callable, NoReturn, TypeVar

from torchtitan.tools import launch, launch_control

# What a user can fix: config values, paths, permissions, data, checkpoints, diverging training.
# (tomllib.TOMLDecodeError is a ValueError; OSError subclasses cover missing/unwritable paths.)
USER_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
               FileExistsError, FloatingPointError)

T = TypeVar("T")
# Read at import, before the trainer sets RANK and friends for a single process.
UNDER_LAUNCHER = "LOCAL_RANK" in os.environ


class Interrupted(KeyboardInterrupt):
    """Ctrl-C ended the run: ``clean`` when it stopped between steps (and saved, when
    checkpointing is on), else at once."""

    def __init__(self, message: str, clean: bool):
        super().__init__(message)
        self.clean = clean


def main_with_user_errors(fn: Callable[[list[str] | None], T], argv: list[str] | None = None) -> T:
    """``fn(argv)``; a user error ends the process with one ``error:`` line and exit code 1,
    Ctrl-C with one ``stopped:`` line and exit code 130."""
    launch.enable_fault_log()
    if UNDER_LAUNCHER:  # a rank: it must not outlive its launcher (kill -9, the OOM killer)
        launch.die_with_launcher()
    try:
        return fn(argv)
    except KeyboardInterrupt as e:
        exit_interrupted(e, hard=_launched() or getattr(fn, "__module__", "") == "__main__")
    except USER_ERRORS as e:
        if os.environ.get("TORCHTITAN_TRACEBACK", "") not in ("", "0"):
            launch.record_crash(e)
            raise
        # A script run as __main__ or under a launcher may exit hard; a caller running ``main``
        # in-process (a test) gets SystemExit.
        exit_with_error(e, hard=_launched() or getattr(fn, "__module__", "") == "__main__")
    except Exception as e:  # a bug or a crash: the launcher shows this traceback as the root cause
        launch.record_crash(e)
        raise


TRACEBACK_HINT = "(set TORCHTITAN_TRACEBACK=1 for the full traceback)"
LONG_MESSAGE = 600  # characters: a one-line message longer than this is wrapped (see error_line)
FIRST_LINE = 200  # the most a wrapped message keeps on its error: line


def error_line(e: BaseException) -> str:
    """What a user error prints (``[rankN] `` first when this is one of several ranks): one line,
    ``error: <Type>: <message> <hint>``. A message of several lines (the problem and its fix first,
    then the detail) or one over LONG_MESSAGE characters keeps a short ``error:`` line; the rest
    follows indented, then the hint: a 700-character line hides the fix in a terminal's wrap."""
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    lines = [part.strip() for part in str(e).splitlines() if part.strip()] or [type(e).__name__]
    if isinstance(e, OSError) and e.filename and str(e.filename) not in " ".join(lines):
        lines[0] = f"{lines[0]}: {e.filename}"
    head = f"{prefix}error: {type(e).__name__}: "
    if len(lines) == 1 and len(lines[0]) > LONG_MESSAGE:
        lines = _wrap(lines[0], FIRST_LINE - len(head))
    if len(lines) == 1:
        return f"{head}{lines[0]} {TRACEBACK_HINT}"
    return "\n".join([head + lines[0], *(f"  {line}" for line in lines[1:]), f"  {TRACEBACK_HINT}"])


def _wrap(message: str, first: int) -> list[str]:
    """``message`` cut after a clause (``; `` ``: `` ``. `` ``, ``) within ``first`` characters, the rest
    wrapped at 100 columns."""
    cut = max((message.rfind(sep, 0, first) + len(sep) for sep in ("; ", ": ", ". ", ", ")), default=0)
    if cut < first // 3:  # no clause to end on: the last space
        cut = message.rfind(" ", 0, first) + 1 or first
    return [message[:cut].strip(), *textwrap.wrap(message[cut:], 100)]


def exit_with_error(e: BaseException, hard: bool = True) -> NoReturn:
    """Print and record ``error_line(e)``, stop what must not outlive the process, exit with code 1.

    With a process group or another non-daemon thread alive: ``os._exit``, which skips the
    interpreter's teardown -- a gloo process group that was not destroyed after a barrier aborts
    there at random ("terminate called without an active exception"), the peers of a failed rank
    cannot join a barrier anyway (torchrun stops them), and a stuck thread would keep the process.
    Otherwise, or with ``hard`` False (``main`` called in-process, not as the script), ``SystemExit(1)``,
    which the caller (a test) can catch.
    """
    line = error_line(e)
    print(line, file=sys.stderr, flush=True)
    launch.record_user_error(line)
    logging.shutdown()
    sys.stdout.flush()
    stop_background_saver()
    getattr(sys.modules.get("torchtitan.components.run_lock"), "release_all", lambda: None)()  # os._exit skips atexit
    if hard and _teardown_is_unsafe():
        os._exit(1)
    raise SystemExit(1) from None


def exit_interrupted(e: KeyboardInterrupt, hard: bool = True) -> NoReturn:
    """One ``stopped:`` line for a Ctrl-C, then exit: 130 as a shell reports Ctrl-C; 0 for a rank
    that stopped cleanly under a launcher (the launcher reports the 130; a failed rank would make
    torchelastic stop its peers, or restart the group with --max-restarts)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C now would only add a traceback
    clean = getattr(e, "clean", False)
    message = str(e) or "interrupted (Ctrl-C) before training started; nothing was saved"
    exit_now(f"stopped: {message}", 0 if clean and UNDER_LAUNCHER else 130, hard)


def exit_now(line: str, code: int, hard: bool = True, at_once: bool = False) -> NoReturn:
    """Print ``line``, release what must not outlive the process and exit with ``code``:
    ``os._exit`` when teardown is unsafe (see ``exit_with_error``) or ``at_once`` (from a signal
    handler: SystemExit would unwind through the trainer's clean-up, which may wait on a save)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank{rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    print(prefix + line, file=sys.stderr, flush=True)
    logging.shutdown()
    sys.stdout.flush()
    stop_background_saver()
    getattr(sys.modules.get("torchtitan.components.run_lock"), "release_all", lambda: None)()
    if at_once or (hard and _teardown_is_unsafe()):
        os._exit(code)
    raise SystemExit(code) from None


def print_start_line(script: str, argv: list[str], default_config: str | os.PathLike = "") -> None:
    """The first line of a run, before torch is imported (1-2 s): what is starting. Not under a
    launcher, which prints its own, nor for ``--help``."""
    if not UNDER_LAUNCHER and "--help" not in argv and "-h" not in argv:
        print(f"{script}: starting 1 process: {launch_control.describe_run(argv, default_config)}", flush=True)


def _launched() -> bool:
    return "RANK" in os.environ or "LOCAL_RANK" in os.environ


def stop_background_saver() -> None:
    """DCP's checkpoint process (async_with_pinned_mem) must not outlive the trainer."""
    checkpoint = sys.modules.get("torchtitan.components.checkpoint")  # not imported: nothing to stop
    try:
        if checkpoint is not None:
            checkpoint._stop_checkpoint_process()
    except Exception:  # best effort on the way out
        pass


def _teardown_is_unsafe() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported: no process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        return True
    main = threading.main_thread()
    return any(t is not main and t.is_alive() and not t.daemon for t in threading.enumerate())

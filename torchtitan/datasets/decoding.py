"""Local files' bytes to text, and what happens to bytes that are not UTF-8.

``data.decode_errors = "replace"`` (the default) turns each invalid byte sequence into U+FFFD
exactly as ``bytes.decode("utf-8", errors="replace")`` does, so the text, the token stream and
the loader state are what they were before the counting existed; the count of such bytes is
reported per source, never silently. ``"strict"`` refuses the first such file with a one-line
error. Nothing here is part of the loader state: after a resume the counts start again.

Every DataLoader worker reads the whole stream (see packing.py); only the main process or
worker 0 logs, so a warning is printed once per rank, not once per worker.
"""

import codecs
import logging
import threading
from pathlib import Path

from torch.utils.data import get_worker_info

from torchtitan.config.job_config import Data, choices

logger = logging.getLogger(__name__)

_HANDLER = "torchtitan.count_replace"
_counts = threading.local()  # bytes replaced by the current decode call, per thread


def _count_and_replace(error: UnicodeDecodeError) -> tuple[str, int]:
    # The same replacement as errors="replace" (one U+FFFD per invalid sequence), counted.
    _counts.bad_bytes += error.end - error.start
    return "\ufffd", error.end


codecs.register_error(_HANDLER, _count_and_replace)


def decode_counting(data: bytes) -> tuple[str, int]:
    """``data`` decoded as UTF-8 with invalid sequences replaced by U+FFFD, and how many bytes were."""
    _counts.bad_bytes = 0
    return data.decode("utf-8", errors=_HANDLER), _counts.bad_bytes


def _logs_here() -> bool:
    info = get_worker_info()
    return info is None or info.id == 0


def _strict_error(source: str, where: str, data: bytes) -> ValueError:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        detail = f"byte 0x{data[e.start]:02x} at offset {e.start:,}"
    return ValueError(
        f"dataset {source!r}: {where} is not UTF-8 ({detail}); convert it (e.g. iconv -f latin1 -t utf-8) "
        f'or set data.decode_errors = "replace" to train on it with U+FFFD in place of those bytes'
    )


class Decoder:
    """Decodes one source's documents and counts, per epoch, the files and bytes that were not UTF-8.

    Reports: the first such file once it is read (one line, with its byte count), and, when the
    first epoch this process reads ends with more than one such file, one line with the totals.
    ``quiet`` replaces without reporting (the embedded stdlib corpus holds 4 test files that are
    not UTF-8 on purpose; warning about them on every default run would teach users to ignore it).
    """

    def __init__(self, source: str, errors: str = "replace", quiet: bool = False):
        if errors not in choices(Data, "decode_errors"):
            raise ValueError(f"data.decode_errors={errors!r}; use one of {choices(Data, 'decode_errors')}")
        self.source, self.errors, self.quiet = source, errors, quiet
        self.bad_files = self.bad_bytes = 0
        self._file_bytes = 0  # of the file being read
        self._reported_file = self._reported_epoch = False

    def text(self, data: bytes, where: str) -> str:
        """One document's text; ``where`` names it in a strict error (a file, or a file's record)."""
        text, bad = decode_counting(data)
        if bad and self.errors == "strict":
            raise _strict_error(self.source, where, data)
        self._file_bytes += bad
        return text

    def file_done(self, path: Path) -> None:
        if not self._file_bytes:
            return
        self.bad_files += 1
        self.bad_bytes += self._file_bytes
        if not self._reported_file and not self.quiet and _logs_here():
            logger.warning(
                f"data: source {self.source!r}: {path} has {self._file_bytes:,} bytes not UTF-8 (replaced with "
                f"U+FFFD; other such files are counted until the epoch ends); {self._fix()}"
            )
        self._reported_file = True
        self._file_bytes = 0

    def epoch_done(self, epoch: int) -> None:
        if self.bad_files > 1 and not self._reported_epoch and not self.quiet and _logs_here():
            logger.warning(
                f"data: source {self.source!r}: {self.bad_files:,} files / {self.bad_bytes:,} bytes not UTF-8 "
                f"in epoch {epoch} (replaced with U+FFFD); {self._fix()}"
            )
        self._reported_epoch = self._reported_epoch or self.bad_files > 1
        self.bad_files = self.bad_bytes = 0

    @staticmethod
    def _fix() -> str:
        return 'set data.decode_errors = "strict" to refuse them'


class RolloverLog:
    """Logs a source's first epoch rollover, once: a dataset smaller than a batch loops every step,
    and one line per loop would bury the log."""

    def __init__(self, source: str):
        self.source = source
        self.logged = False

    def epoch_done(self, epoch: int, documents: int | None) -> None:
        if self.logged:
            return
        self.logged = True
        if _logs_here():
            plural = "" if documents == 1 else "s"
            count = f" after {documents:,} document{plural}" if documents is not None else ""
            logger.info(f"dataset {self.source!r}: epoch {epoch} done{count}, looping (logged once)")

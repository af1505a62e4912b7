"""Training the embedded tokenizer: a byte-level BPE on the Python stdlib, in tiktoken format.

The HF ``tokenizers`` trainer (Rust) does the counting and merging; we convert its merges to a
tiktoken rank file: the 256 single bytes get ranks 0..255 in byte order, then each merged token
gets the next rank in merge order. tiktoken always applies the lowest-ranked merge first, so it
reproduces the trained merge order. The trainer is deterministic (ties break on token ids, which
are assigned in a fixed order), with any thread count; tests check that byte for byte.

``ensure_embedded_tokenizer`` builds the file once per cache dir, safely from many processes.
"""

import base64
import fcntl
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from torchtitan.components.tokenizer import LLAMA3_PATTERN, NUM_SPECIAL_TOKENS
from torchtitan.datasets.stdlib_corpus import read_document, stdlib_files

logger = logging.getLogger(__name__)

# Bump when training changes (corpus, pattern, algorithm) so stale cached files are not reused.
EMBEDDED_VERSION = "v1"
DEFAULT_VOCAB_SIZE = 4096  # total, including the 256 special tokens
FIRST_RUN_SECONDS = "5-20 s"  # measured on 2 cores: 4.1 s idle, 9.0 s and 19.8 s shared with other jobs


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which HF's ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:  # control chars and spaces move to 256+ so every byte has a visible char
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@cache
def _unicode_to_bytes() -> dict[str, int]:
    return {char: b for b, char in bytes_to_unicode().items()}


def _hf_token_to_bytes(token: str) -> bytes:
    return bytes(_unicode_to_bytes()[char] for char in token)


def _ranks_from_merges(merges: list) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge  # old/new HF format
        # Two merges can yield the same bytes; the first keeps its rank so ranks stay 0..n-1.
        ranks.setdefault(_hf_token_to_bytes(left) + _hf_token_to_bytes(right), len(ranks))
    return ranks


def _documents(files: Iterable[Path]) -> Iterator[str]:
    for path in files:
        yield read_document(path)


def train_hf_bpe(files: Iterable[Path], n_ranks: int):
    """The trained HF ``tokenizers.Tokenizer`` (tests compare its encodings with tiktoken's)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    if n_ranks < 256:
        raise ValueError(f"n_ranks must be at least 256 (one per byte), got {n_ranks}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            # Maps bytes to GPT-2's printable chars; the regex split above already happened.
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=n_ranks,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_documents(files), trainer=trainer)
    return tokenizer


def train_bpe(files: Iterable[Path], n_ranks: int) -> dict[bytes, int]:
    """Byte-level BPE with Llama 3's pre-tokenization: ``n_ranks`` tokens (256 bytes + merges)."""
    return hf_bpe_to_ranks(train_hf_bpe(files, n_ranks))


def hf_bpe_to_ranks(tokenizer) -> dict[bytes, int]:
    """tiktoken ranks of a trained HF byte-level BPE ``tokenizers.Tokenizer``."""
    return _ranks_from_merges(json.loads(tokenizer.to_str())["model"]["merges"])


def write_tiktoken_file(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write ``ranks`` as 'base64-token rank' lines; atomic, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items()]
    lines.sort(key=lambda line: int(line.split()[1]))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    return Path(os.environ.get("TORCHTITAN_CACHE") or Path.home() / ".cache" / "torchtitan")


def embedded_tokenizer_path(cache_dir: str | Path = "", vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    # The corpus is this Python's stdlib, which changes between Python releases: key on the version
    # so a cache shared by two interpreters never hands one the other's vocabulary.
    py = "py{}.{}.{}".format(*sys.version_info[:3])
    name = f"stdlib_bpe_{EMBEDDED_VERSION}_{py}_{vocab_size}.tiktoken"
    return Path(cache_dir or default_cache_dir()).expanduser() / name


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process builds: say why this one is silent meanwhile
            logger.info(f"waiting for another process to finish training the embedded tokenizer ({lock_path})")
            fcntl.flock(f, fcntl.LOCK_EX)  # freed if that process dies
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_embedded_tokenizer(cache_dir: str | Path = "", vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Path of the embedded tokenizer file, training it first if no process has yet.

    Safe to call from every rank at once: one trains under a file lock while the others wait,
    then find the finished file. ``cache_dir`` empty = $TORCHTITAN_CACHE or ~/.cache/torchtitan.
    """
    path = embedded_tokenizer_path(cache_dir, vocab_size)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.with_name(path.name + ".lock")):
        if path.exists():  # built by another process while we waited for the lock
            return path
        logger.info(f"training the embedded tokenizer (first run only, {FIRST_RUN_SECONDS}), cached in {path.parent}")
        start = time.perf_counter()
        ranks = train_bpe(stdlib_files("train"), vocab_size - NUM_SPECIAL_TOKENS)
        write_tiktoken_file(ranks, path)
        logger.info(f"Trained the embedded tokenizer ({len(ranks)} ranks) in "
                    f"{time.perf_counter() - start:.1f}s: {path}")
    return path

"""Tokenizers: Llama 3's tiktoken format, Llama 2's sentencepiece, and the embedded default
(Hugging Face tokenizer.json is the third format: ``hf_tokenizer.py``).

``build_tokenizer(path)`` picks the format from the file's content, not its name (Llama 3 ships
its tiktoken file as ``tokenizer.model``, the same name Llama 2 uses for sentencepiece). An
empty path gives the embedded tokenizer: a byte-level BPE trained on the Python stdlib on first
use and cached (see ``tokenizer_training.py``), so the framework runs fully offline.
"""

import base64
import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

import tiktoken

# Llama 3's pre-tokenization pattern (Meta's llama3 tokenizer.py); the embedded BPE trains with it too.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256

# tiktoken hits a pathological case (and can overflow a stack) on huge inputs or huge runs of
# whitespace / non-whitespace; Meta's code caps both, and so do we, with the same limits.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/=]+ \d+")
_JSON_OBJECT_START = re.compile(rb'\s*\{\s*["}]')

_FORMATS_HINT = (
    "a tiktoken file (Llama 3: one 'base64-token rank' per line), "
    "a sentencepiece .model file (Llama 2) or a Hugging Face tokenizer.json (or its folder)"
)


class Tokenizer(ABC):
    """What the data pipeline and generation need from any tokenizer."""

    @abstractmethod
    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str: ...

    @property
    @abstractmethod
    def n_words(self) -> int:
        """Vocabulary size including special tokens (the model's embedding rows)."""

    @property
    @abstractmethod
    def bos_id(self) -> int: ...

    @property
    @abstractmethod
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int:
        return -1


def llama3_special_tokens() -> list[str]:
    """The 256 special tokens of Llama 3, in Meta's order (ids follow the base ranks)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_SPECIAL_TOKENS - 5)]
    return named + reserved


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file, as ``tiktoken.load.load_tiktoken_bpe`` does.

    Not that function itself: it caches every file in /tmp/data-gym-cache keyed by the path
    string, so a file rewritten at the same path (a retrained tokenizer) would load stale ranks.
    """
    ranks = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{line_no}: not a 'base64-token rank' line: {line[:80]!r}") from e
    if sorted(ranks.values()) != list(range(len(ranks))):
        # Special tokens take ids len(ranks)..; gaps or duplicates would make ids collide.
        raise ValueError(f"{path}: ranks must be exactly 0..{len(ranks) - 1}, each once")
    return ranks


@functools.cache
def _long_run_pattern(max_run: int) -> re.Pattern:
    # The lookbehinds anchor each attempt at the start of a run, so the search stays linear
    # instead of rescanning a long run from every position inside it.
    return re.compile(rf"(?<!\S)\S{{{max_run + 1}}}|(?<!\s)\s{{{max_run + 1}}}")


def split_long_runs(text: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cut ``text`` so no piece holds more than ``max_run`` consecutive (non-)whitespace chars."""
    if len(text) <= max_run or not _long_run_pattern(max_run).search(text):
        yield text  # the usual case: nothing to cut, skip the per-character loop
        return
    # Meta's loop, kept verbatim in behaviour so token ids match Llama 3's reference encoder.
    run_len, run_is_space, start = 0, text[:1].isspace(), 0
    for i, char in enumerate(text):
        is_space = char.isspace()
        if run_is_space != is_space:
            run_len, run_is_space = 1, is_space
            continue
        run_len += 1
        if run_len > max_run:
            yield text[start:i]
            start, run_len = i, 1
    yield text[start:]


class TikTokenizer(Tokenizer):
    """Llama 3 tokenizer: tiktoken BPE ranks from ``path`` plus 256 special tokens after them."""

    def __init__(self, path: str | Path):
        ranks = load_tiktoken_ranks(path)
        self.num_base_tokens = len(ranks)
        self.special_tokens = {
            token: self.num_base_tokens + i for i, token in enumerate(llama3_special_tokens())
        }
        self.model = tiktoken.Encoding(
            name=Path(path).name,
            pat_str=LLAMA3_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i : i + TIKTOKEN_MAX_ENCODE_CHARS]):
                # Special-token strings in documents are ordinary text, never control tokens.
                ids.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    @property
    def n_words(self) -> int:
        return self.num_base_tokens + len(self.special_tokens)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]


class SentencePieceTokenizer(Tokenizer):
    """Llama 2 tokenizer: a sentencepiece ``.model``; bos/eos/pad ids come from the model."""

    def __init__(self, path: str | Path):
        from sentencepiece import SentencePieceProcessor

        self.model = SentencePieceProcessor(model_file=str(path))
        assert self.model.vocab_size() == self.model.get_piece_size()

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        ids = self.model.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids)

    @property
    def n_words(self) -> int:
        return self.model.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.model.bos_id()

    @property
    def eos_id(self) -> int:
        return self.model.eos_id()

    @property
    def pad_id(self) -> int:
        return self.model.pad_id()


def _looks_like_json(path: Path) -> bool:
    # A JSON object's start; tiktoken lines are base64, and a sentencepiece proto starts b"\n<len>\n".
    with open(path, "rb") as f:
        return _JSON_OBJECT_START.match(f.read(64)) is not None


def _looks_like_tiktoken(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    first_line = next((line.strip() for line in head.splitlines() if line.strip()), b"")
    return _TIKTOKEN_LINE.fullmatch(first_line) is not None


def _loads_as_sentencepiece(path: Path) -> bool:
    from sentencepiece import SentencePieceProcessor

    try:
        SentencePieceProcessor(model_file=str(path))
    except RuntimeError:  # what sentencepiece raises for anything it cannot parse
        return False
    return True


def build_tokenizer(path: str, cache_dir: str = "") -> Tokenizer:
    """The tokenizer at ``path`` (format detected from content), or the embedded one if empty."""
    if not path:
        from torchtitan.components.tokenizer_training import ensure_embedded_tokenizer

        return TikTokenizer(ensure_embedded_tokenizer(cache_dir))
    file = Path(path).expanduser()
    if file.is_dir() or (file.is_file() and _looks_like_json(file)):
        # Imported here: hf_tokenizer.py subclasses Tokenizer from this module.
        from torchtitan.components.hf_tokenizer import HFTokenizer

        return HFTokenizer(file)
    if not file.is_file():
        raise ValueError(
            f"tokenizer file {str(file)!r} does not exist: set tokenizer.path to a tiktoken or "
            "sentencepiece .model file or a Hugging Face tokenizer.json (or its folder), "
            "or leave it empty for the embedded tokenizer"
        )
    if _looks_like_tiktoken(file):
        return TikTokenizer(file)
    if _loads_as_sentencepiece(file):
        return SentencePieceTokenizer(file)
    raise ValueError(f"tokenizer file {str(file)!r} is in no known format: expected {_FORMATS_HINT}")

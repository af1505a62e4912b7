"""Tokenizers: round trips for every format, special ids, compression, training determinism, errors.

The embedded tokenizer is built once per session in a temp cache dir (never the user's ~/.cache),
by several processes at once, which also checks the file lock.
"""

import functools
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm

from torchtitan.components.tokenizer import (
    NUM_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    TikTokenizer,
    build_tokenizer,
    split_long_runs,
)
from torchtitan.components.tokenizer_training import (
    _hf_token_to_bytes,
    default_cache_dir,
    embedded_tokenizer_path,
    hf_bpe_to_ranks,
    train_bpe,
    train_hf_bpe,
    write_tiktoken_file,
)
from torchtitan.datasets.stdlib_corpus import read_document, stdlib_files

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_TIKTOKEN = Path(__file__).resolve().parents[2] / "shared/data/test_tiktoken.model"

TRICKY_TEXT = (
    "héllo wörld — naïve café 日本語のテキスト 🙂👍🏽 e\u0301 \U0001f600\n"
    "\tdef f(x):\r\n        return x ** 2  # tabs, CRLF, runs of spaces   \n\n\n"
    "special strings stay text: <|begin_of_text|> <|end_of_text|> <|eot_id|>\n"
)


def _build_concurrently(cache_dir: Path, n_procs: int = 3) -> Path:
    code = (
        "import sys; from torchtitan.components.tokenizer_training import ensure_embedded_tokenizer;"
        "print(ensure_embedded_tokenizer(sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-c", code, str(cache_dir)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n_procs)]
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert len(set(outputs)) == 1, outputs
    return Path(outputs[0])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("torchtitan_cache")
    path = _build_concurrently(cache)
    assert path == embedded_tokenizer_path(cache)
    # The lock and the atomic write leave exactly the finished file and its lock file behind.
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".lock"]
    return cache


@pytest.fixture(scope="session")
def embedded(cache_dir) -> TikTokenizer:
    return build_tokenizer("", cache_dir=str(cache_dir))


def _assert_round_trip(tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.n_words for i in ids)
    return ids


@functools.cache
def _sample_documents() -> list[str]:
    docs = [read_document(p) for p in stdlib_files("validation")[:3]]
    non_ascii = (read_document(p) for p in stdlib_files("all"))
    docs += [d for d in non_ascii if not d.isascii() and "\ufffd" not in d][:2]
    return docs + [TRICKY_TEXT]


def test_embedded_round_trip_and_special_ids(embedded):
    assert isinstance(embedded, TikTokenizer)
    assert embedded.n_words == 4096 and embedded.num_base_tokens == 4096 - NUM_SPECIAL_TOKENS
    for text in _sample_documents():
        _assert_round_trip(embedded, text)
    ids = embedded.encode("x = 1", bos=True, eos=True)
    assert ids[0] == embedded.bos_id == 3840 and ids[-1] == embedded.eos_id == 3841
    assert embedded.decode(ids[1:-1]) == "x = 1"
    assert embedded.special_tokens["<|eot_id|>"] == 3840 + 9
    # Special-token strings inside documents are encoded as plain text, not as control ids.
    assert all(i < 3840 for i in embedded.encode("<|begin_of_text|><|eot_id|>", bos=False, eos=False))


def test_embedded_compresses_stdlib(embedded):
    n_bytes = n_tokens = 0
    for path in stdlib_files("validation"):
        text = read_document(path)
        n_bytes += len(text.encode())
        n_tokens += len(embedded.encode(text, bos=False, eos=False))
    assert n_bytes / n_tokens > 2.5, f"{n_bytes / n_tokens:.2f} bytes per token"


def test_long_runs_are_chunked(embedded):
    # Far beyond the 25k-run and 400k-chunk caps Meta's encoder needs to stay fast and safe.
    text = "a" * 60_000 + " " * 30_000 + "b\n" * 250_000
    pieces = list(split_long_runs(text))
    assert "".join(pieces) == text and len(pieces) == 4
    assert list(split_long_runs("short text")) == ["short text"]
    _assert_round_trip(embedded, text)


def test_cache_dir_from_env(embedded, cache_dir, monkeypatch):
    monkeypatch.setenv("TORCHTITAN_CACHE", str(cache_dir))
    assert default_cache_dir() == cache_dir
    assert build_tokenizer("").encode(TRICKY_TEXT, bos=False, eos=False) == embedded.encode(
        TRICKY_TEXT, bos=False, eos=False
    )


def test_tiny_tiktoken_file(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"  ": 258})
    path = tmp_path / "tiny.tiktoken"
    write_tiktoken_file(ranks, path)
    tokenizer = build_tokenizer(str(path))
    assert isinstance(tokenizer, TikTokenizer) and tokenizer.n_words == 259 + NUM_SPECIAL_TOKENS
    assert tokenizer.encode("abc abc", bos=True, eos=True) == [259, 257, 32, 257, 260]
    _assert_round_trip(tokenizer, TRICKY_TEXT)


def test_shared_llama3_tiktoken_file():
    if not SHARED_TIKTOKEN.is_file():
        pytest.skip(f"{SHARED_TIKTOKEN} absent: the shared test assets are not checked out beside the repo")
    tokenizer = build_tokenizer(str(SHARED_TIKTOKEN))
    assert isinstance(tokenizer, TikTokenizer) and tokenizer.n_words == 2000 + NUM_SPECIAL_TOKENS
    assert tokenizer.bos_id == 2000 and tokenizer.eos_id == 2001 and tokenizer.pad_id == -1
    for text in _sample_documents():
        _assert_round_trip(tokenizer, text)


def test_sentencepiece_round_trip(tmp_path):
    lines = read_document(stdlib_files("all")[0]).splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,  # like Llama 2: unseen characters become byte pieces, not <unk>
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    tokenizer = build_tokenizer(str(path))
    assert isinstance(tokenizer, SentencePieceTokenizer) and tokenizer.n_words == 400
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    _assert_round_trip(tokenizer, TRICKY_TEXT)
    ids = tokenizer.encode("hello", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and tokenizer.decode(ids) == "hello"


def test_training_is_deterministic(tmp_path):
    files = stdlib_files("train")[:20]
    paths = [tmp_path / "a" / "tok.tiktoken", tmp_path / "b" / "tok.tiktoken"]
    for path in paths:
        write_tiktoken_file(train_bpe(files, 600 - NUM_SPECIAL_TOKENS), path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    ranks = TikTokenizer(paths[0]).model._mergeable_ranks
    assert len(ranks) == 600 - NUM_SPECIAL_TOKENS
    assert all(ranks[bytes([b])] == b for b in range(256))


def test_tiktoken_reproduces_hf_bpe(tmp_path):
    # Parity with an independent encoder: tiktoken on the converted ranks must split every
    # document into exactly the tokens HF's BPE (which trained the merges) produces.
    hf = train_hf_bpe(stdlib_files("train")[:50], 1000)
    path = tmp_path / "tok.tiktoken"
    write_tiktoken_file(hf_bpe_to_ranks(hf), path)
    tokenizer = TikTokenizer(path)
    for text in _sample_documents():
        expected = [_hf_token_to_bytes(t) for t in hf.encode(text).tokens]
        ids = tokenizer.encode(text, bos=False, eos=False)
        assert [tokenizer.model.decode_single_token_bytes(i) for i in ids] == expected


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match="nope.model.*set tokenizer.path.*embedded tokenizer"):
        build_tokenizer(str(missing))


@pytest.mark.parametrize("content", [b"hello world\nnot a tokenizer\n", bytes(range(256)) * 4, b""])
def test_bad_format_error(tmp_path, content):
    path = tmp_path / "bad.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="bad.model.*tiktoken.*sentencepiece"):
        build_tokenizer(str(path))


def test_bad_tiktoken_ranks_error(tmp_path):
    path = tmp_path / "gap.tiktoken"
    path.write_text("YQ== 0\nYg== 2\n")  # rank 1 missing: special ids would collide
    with pytest.raises(ValueError, match="ranks must be exactly"):
        build_tokenizer(str(path))

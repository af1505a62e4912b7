"""Hugging Face tokenizer.json: our tokenizers written as one encode exactly as ours through
transformers' AutoTokenizer, HFTokenizer reads them (and any HF folder) back, and a trained
model's HF export carries its tokenizer.

"Exactly" is ``AutoTokenizer(text)["input_ids"] == [bos] + ours.encode(text)``, checked on the
stdlib corpus (validation files + a fixed sample of train files; every file in a slow test).
"""

import importlib.util
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from torchtitan.components.hf_tokenizer import (
    TIKTOKEN_PAD_TOKEN,
    HFTokenizer,
    save_hf_tokenizer,
    tiktoken_to_hf,
)
from torchtitan.components.tokenizer import (
    TIKTOKEN_MAX_ENCODE_CHARS,
    SentencePieceTokenizer,
    TikTokenizer,
    build_tokenizer,
    split_long_runs,
)
from torchtitan.components.weight_conversion import save_hf_checkpoint
from torchtitan.datasets.stdlib_corpus import read_document, stdlib_files
from torchtitan.models.llama import Transformer, build_model_args
from tests.helpers.runs import read_losses

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
SHARED_TIKTOKEN = REPO.parent / "shared/data/test_tiktoken.model"
# Special-token text, CRLF, tabs, combining marks, emoji: all must stay plain text.
TRICKY_TEXT = (
    "héllo wörld — naïve café 日本語のテキスト 🙂👍🏽 e\u0301 \U0001f600\n"
    "\tdef f(x):\r\n        return x ** 2  # tabs, CRLF, runs of spaces   \n\n\n"
    "special strings stay text: <|begin_of_text|> <|end_of_text|> <|eot_id|> <s> </s>\n"
)
LONG_RUNS_TEXT = "a" * 30_000 + " " * 26_000 + "b\n" * 10  # over our 25k-run cap: ours cuts it


def _corpus_sample() -> list[str]:
    """Every validation file, 200 train files (fixed seed) and the edge cases."""
    train = random.Random(0).sample(stdlib_files("train"), 200)
    return [read_document(p) for p in stdlib_files("validation") + train] + [TRICKY_TEXT, LONG_RUNS_TEXT, "", " "]


def _auto(folder: Path):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def _tiktoken_pieces(text: str) -> list[str]:
    """The pieces our tiktoken path cuts a document into before encoding (Meta's caps)."""
    chunks = [text[i : i + TIKTOKEN_MAX_ENCODE_CHARS] for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS)]
    return [piece for chunk in chunks for piece in split_long_runs(chunk)] or [""]


def _assert_auto_encodes_like_ours(auto, ours, docs: list[str]) -> None:
    got = auto(docs)["input_ids"]  # one batch call: the Rust side runs it in parallel
    for text, ids in zip(docs, got):
        expected = ours.encode(text, bos=True, eos=False)
        if isinstance(ours, TikTokenizer) and len(_tiktoken_pieces(text)) > 1:
            # Our cut can fall inside a token, HF does not cut: compare piece by piece, so
            # everything but the cut is still checked.
            pieces = auto(_tiktoken_pieces(text), add_special_tokens=False)["input_ids"]
            ids = [ours.bos_id] + [i for piece in pieces for i in piece]
        assert ids == expected, f"AutoTokenizer differs from ours on {text[:60]!r}"


@pytest.fixture(scope="module")
def embedded(cache_dir) -> TikTokenizer:
    return build_tokenizer("", cache_dir=str(cache_dir))


@pytest.fixture(scope="module")
def embedded_export(embedded, tmp_path_factory) -> Path:
    return save_hf_tokenizer(embedded, tmp_path_factory.mktemp("embedded_hf"), model_max_length=64)


@pytest.fixture(scope="module")
def shared_tiktoken() -> TikTokenizer:
    if not SHARED_TIKTOKEN.is_file():
        pytest.skip(f"{SHARED_TIKTOKEN} absent: the shared test assets are not checked out beside the repo")
    return build_tokenizer(str(SHARED_TIKTOKEN))


# ----------------------------------------------------------------------------- tiktoken -> AutoTokenizer


def test_embedded_export_encodes_like_ours(embedded, embedded_export):
    auto = _auto(embedded_export)
    _assert_auto_encodes_like_ours(auto, embedded, _corpus_sample())
    assert (auto.bos_token_id, auto.eos_token_id) == (embedded.bos_id, embedded.eos_id) == (3840, 3841)
    assert auto.pad_token == TIKTOKEN_PAD_TOKEN and auto.model_max_length == 64
    # Special-token text in a document stays text, with or without our bos.
    ids = auto("<|begin_of_text|><|eot_id|>", add_special_tokens=False)["input_ids"]
    assert ids == embedded.encode("<|begin_of_text|><|eot_id|>", bos=False, eos=False)
    assert all(i < embedded.num_base_tokens for i in ids)
    assert auto.decode(auto(TRICKY_TEXT)["input_ids"][1:]) == TRICKY_TEXT


@pytest.mark.slow
def test_embedded_export_encodes_like_ours_on_every_stdlib_file(embedded, embedded_export):
    _assert_auto_encodes_like_ours(_auto(embedded_export), embedded, [read_document(p) for p in stdlib_files("all")])


def test_llama3_tiktoken_file_export_encodes_like_ours(shared_tiktoken, tmp_path):
    auto = _auto(save_hf_tokenizer(shared_tiktoken, tmp_path))
    _assert_auto_encodes_like_ours(auto, shared_tiktoken, _corpus_sample())
    assert auto.bos_token_id == shared_tiktoken.bos_id == 2000 and len(auto) == shared_tiktoken.n_words


@pytest.mark.parametrize("which", ["embedded", "shared"])
def test_tiktoken_conversion_equals_transformers_converter(which, request, monkeypatch):
    """Same vocab and merges, in the same order, as transformers' own TikTokenConverter."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ours = request.getfixturevalue("embedded" if which == "embedded" else "shared_tiktoken")
    ranks = {ours.model.decode_single_token_bytes(i): i for i in range(ours.num_base_tokens)}
    # Its loader caches every file in /tmp by path; hand it the ranks directly.
    monkeypatch.setattr(TikTokenConverter, "load_tiktoken_bpe", staticmethod(lambda _: ranks))
    reference = json.loads(TikTokenConverter("unused").converted().to_str())["model"]
    model = json.loads(tiktoken_to_hf(ours).to_str())["model"]
    assert model["vocab"] == reference["vocab"] and model["merges"] == reference["merges"]
    assert model["ignore_merges"] is True and reference["ignore_merges"] is True


# ----------------------------------------------------------------------------- HFTokenizer


def test_hf_tokenizer_round_trip_of_export(embedded, embedded_export):
    texts = [read_document(p) for p in stdlib_files("validation")[:5]] + [TRICKY_TEXT, LONG_RUNS_TEXT[:20_000]]
    for path in (embedded_export, embedded_export / "tokenizer.json"):  # the folder or the file
        tokenizer = build_tokenizer(str(path))
        assert isinstance(tokenizer, HFTokenizer)
        assert tokenizer.n_words == embedded.n_words == 4096
        assert (tokenizer.bos_id, tokenizer.eos_id) == (embedded.bos_id, embedded.eos_id)
        assert tokenizer.pad_id == embedded.special_tokens[TIKTOKEN_PAD_TOKEN]  # ours has none
        for text in texts:
            for bos, eos in ((True, True), (True, False), (False, True), (False, False)):
                assert tokenizer.encode(text, bos=bos, eos=eos) == embedded.encode(text, bos=bos, eos=eos)
            ids = embedded.encode(text, bos=True, eos=True)
            assert tokenizer.decode(ids) == embedded.decode(ids)


def test_export_of_hf_tokenizer_keeps_encoding_and_config(embedded_export, tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "tokenizer.json").write_bytes((embedded_export / "tokenizer.json").read_bytes())
    chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = {"eos_token": "<|end_of_text|>", "chat_template": chat_template, "split_special_tokens": False}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    original = HFTokenizer(source)  # bos from the post-processor's template: no bos_token given
    assert (original.bos_id, original.eos_id, original.pad_id) == (3840, 3841, -1)
    auto = _auto(save_hf_tokenizer(original, tmp_path / "export"))
    docs = [read_document(p) for p in stdlib_files("validation")] + [TRICKY_TEXT]
    _assert_auto_encodes_like_ours(auto, original, docs)
    assert auto.chat_template == chat_template and auto.split_special_tokens is True  # ours win
    assert (tmp_path / "export" / "tokenizer.json").read_text() == (embedded_export / "tokenizer.json").read_text()


def test_bos_eos_rules(embedded_export, tmp_path):
    hf_json = (embedded_export / "tokenizer.json").read_bytes()

    def folder(name: str, **files) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "tokenizer.json").write_bytes(hf_json)
        for file, content in files.items():
            (path / f"{file}.json").write_text(json.dumps(content))
        return path

    # tokenizer_config.json wins over special_tokens_map.json and config.json; AddedToken dicts count.
    first = folder("first", tokenizer_config={"bos_token": {"content": "<|eot_id|>"}, "eos_token": "<|eot_id|>"},
                   special_tokens_map={"bos_token": "<|end_of_text|>"}, config={"bos_token_id": 5})
    assert (HFTokenizer(first).bos_id, HFTokenizer(first).eos_id) == (3849, 3849)
    # config.json's ids (the first of an eos list, as Llama 3.1 writes it); a null bos_token falls through.
    ids = folder("ids", tokenizer_config={"bos_token": None}, config={"bos_token_id": 7, "eos_token_id": [8, 9]})
    assert (HFTokenizer(ids).bos_id, HFTokenizer(ids).eos_id) == (7, 8)
    # GPT-2 style, no template: bos is eos.
    gpt2 = folder("gpt2", special_tokens_map={"eos_token": "<|end_of_text|>"})
    tokenizer = json.loads(hf_json)
    tokenizer["post_processor"] = None
    (gpt2 / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert (HFTokenizer(gpt2).bos_id, HFTokenizer(gpt2).eos_id) == (3841, 3841)
    with pytest.raises(ValueError, match=r"bare.*no eos token found: put a tokenizer_config.json with eos_token"):
        HFTokenizer(folder("bare"))
    with pytest.raises(ValueError, match=r"eos_token '<nope>' is not in the tokenizer's vocabulary"):
        HFTokenizer(folder("unknown", tokenizer_config={"eos_token": "<nope>"}))


_NOT_VALID = "bad.json is not a valid Hugging Face tokenizer.json: "


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"version": "1.0", "model": {"type": "BPE", "vocab": ', _NOT_VALID),  # truncated
        ('{"version": "1.0", "model": 42}', _NOT_VALID),
        ("", "bad.json.*is in no known format.*tokenizer.json"),
    ],
)
def test_bad_tokenizer_json_error(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=match) as error:
        build_tokenizer(str(tmp_path / "bad.json"))
    assert "\n" not in str(error.value)


def test_folder_without_tokenizer_json_error(tmp_path):
    with pytest.raises(ValueError, match=r"has no tokenizer.json: point tokenizer.path at"):
        build_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- sentencepiece


def _train_sentencepiece(path: Path, model_type: str = "bpe", n_files: int = 30, vocab_size: int = 1000) -> Path:
    lines = [line for p in stdlib_files("train")[:n_files] for line in read_document(p).splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # Llama 2's settings
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    path.write_bytes(model.getvalue())
    return path


def test_sentencepiece_export_encodes_like_ours(tmp_path):
    ours = build_tokenizer(str(_train_sentencepiece(tmp_path / "tokenizer.model")))
    assert isinstance(ours, SentencePieceTokenizer)
    folder = save_hf_tokenizer(ours, tmp_path / "hf")
    docs = [read_document(p) for p in stdlib_files("validation")] + [TRICKY_TEXT, "  two leading spaces", "▁x", ""]
    auto = _auto(folder)
    _assert_auto_encodes_like_ours(auto, ours, docs)
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token) == (1, 2, None)
    back = build_tokenizer(str(folder))
    assert (back.n_words, back.bos_id, back.eos_id, back.pad_id) == (1000, 1, 2, -1)
    for text in docs[:3] + [TRICKY_TEXT]:
        ids = back.encode(text, bos=True, eos=True)
        assert ids == ours.encode(text, bos=True, eos=True) and back.decode(ids[1:-1]) == ours.decode(ids)


def test_sentencepiece_unigram_is_refused(tmp_path):
    ours = build_tokenizer(str(_train_sentencepiece(tmp_path / "unigram.model", "unigram", n_files=5, vocab_size=400)))
    with pytest.raises(ValueError, match="only BPE sentencepiece models.*UNIGRAM"):
        save_hf_tokenizer(ours, tmp_path / "hf")


# ----------------------------------------------------------------------------- model exports


def test_export_rejects_a_bigger_tokenizer(embedded, tmp_path):
    args = build_model_args("debugmodel_tiny", vocab_size=1000, max_seq_len=64)
    with torch.device("meta"):
        sd = Transformer(args).state_dict()
    with pytest.raises(ValueError, match="tokenizer has 4096 tokens but the model only 1000"):
        save_hf_checkpoint(sd, args, tmp_path / "hf", tokenizer=embedded)
    assert not (tmp_path / "hf" / "model.safetensors").exists()


def _convert_dcp_to_hf():
    spec = importlib.util.spec_from_file_location("convert_dcp_to_hf", REPO / "scripts" / "convert_dcp_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _train(dump: Path, cache_dir: Path, *extra: str) -> Path:
    """2 steps of debugmodel_tiny with a checkpoint and the end-of-training HF export in <dump>/hf."""
    cmd = [
        sys.executable, str(REPO / "train.py"), "--model.flavor", "debugmodel_tiny", "--training.steps", "2",
        "--training.seq_len", "64", "--training.global_batch_size", "4", "--metrics.log_freq", "1",
        "--job.dump_folder", str(dump), "--tokenizer.cache_dir", str(cache_dir),
        "--checkpoint.hf_export_folder", "hf", *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dump


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("run"), cache_dir, "--checkpoint.enable")


def test_trained_model_export_carries_the_tokenizer(trained, embedded, tmp_path):
    dump, export = trained, trained / "hf"
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in export.iterdir()}
    config = json.loads((export / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (embedded.bos_id, embedded.eos_id)
    auto = _auto(export)
    assert auto(TRICKY_TEXT)["input_ids"] == embedded.encode(TRICKY_TEXT, bos=True, eos=False)
    assert auto.model_max_length == 64
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    assert model.generation_config.eos_token_id == embedded.eos_id  # generate() stops at our eos

    # convert_dcp_to_hf.py takes the run's tokenizer from the checkpoint's config.toml ...
    convert = _convert_dcp_to_hf()
    convert([str(dump / "checkpoint" / "step-2"), str(tmp_path / "converted")])
    assert (tmp_path / "converted" / "tokenizer.json").read_bytes() == (export / "tokenizer.json").read_bytes()
    # ... or --tokenizer, or none.
    if SHARED_TIKTOKEN.is_file():
        convert([str(dump / "checkpoint" / "step-2"), str(tmp_path / "llama3"), "--tokenizer", str(SHARED_TIKTOKEN)])
        assert _auto(tmp_path / "llama3").bos_token_id == 2000
    convert([str(dump / "checkpoint" / "step-2"), str(tmp_path / "bare"), "--no-tokenizer"])
    assert not (tmp_path / "bare" / "tokenizer.json").exists() and (tmp_path / "bare" / "model.safetensors").exists()


def test_training_on_an_exported_tokenizer_sees_the_same_tokens(trained, cache_dir, tmp_path):
    """tokenizer.path = an export folder (HFTokenizer) feeds the data pipeline exactly the tokens the
    embedded tiktoken does: same losses, and its own export writes the same tokenizer.json back."""
    hf = _train(tmp_path / "hf", cache_dir, "--tokenizer.path", str(trained / "hf"))
    assert read_losses(hf) == read_losses(trained) and len(read_losses(trained)) == 2
    assert (hf / "hf" / "tokenizer.json").read_bytes() == (trained / "hf" / "tokenizer.json").read_bytes()

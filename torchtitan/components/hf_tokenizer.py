"""Hugging Face ``tokenizer.json`` as a tokenizer format, and our tokenizers written as one.

``HFTokenizer`` reads a ``tokenizer.json`` (the ``tokenizers`` library's format) or a folder
holding one. ``save_hf_tokenizer`` writes any of our tokenizers as tokenizer.json +
tokenizer_config.json + special_tokens_map.json, so an exported model folder loads with
``AutoTokenizer.from_pretrained`` and encodes exactly as training did:

- tiktoken (ours and Llama 3's): the ranks become a byte-level BPE built with ``tokenizers``
  alone (no transformers at run time): every split of a token into two tokens is a merge ranked
  by the token's rank, ``ignore_merges`` looks a whole pre-token up first as tiktoken does, and
  the pre-tokenizer is our LLAMA3_PATTERN split + GPT-2's byte mapping, as Llama 3's own file.
- sentencepiece BPE (Llama 2's kind): transformers' converter
  (``SpmConverter.build_tokenizer_from_spm_proto``, needs transformers), which follows the
  model's normalizer spec; exact for Llama 2's identity rule (nmt_nfkc differs on rare inputs).
- tokenizer.json: copied, with the post-processor below; its tokenizer_config.json's other
  keys (e.g. a chat template) are kept.

Two choices make ``AutoTokenizer(text)["input_ids"]`` equal ``[bos] + our ids``, what lm-eval's
``hf`` backend and ``generate`` see: the post-processor prepends bos (never eos), as Llama 3's
tokenizer.json does, and ``split_special_tokens`` is on, so special-token text inside a
document (``"<|eot_id|>"``) stays text as in our training data; set it to false in
tokenizer_config.json for chat templates that write control tokens as text.
``HFTokenizer.encode`` skips the post-processor and adds only the bos/eos it is asked for.

One known difference: our tiktoken path cuts documents over 400,000 characters and runs of over
25,000 (non-)whitespace characters into pieces first, as Meta's encoder does, and a cut can fall
inside a token; HF does not cut (in the stdlib corpus only pydoc_data/topics.py is that long).
The pad of a tiktoken export is <|reserved_special_token_2|> (ours has none; tools want one).
"""

import json
import logging
from pathlib import Path
from typing import Optional

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from torchtitan.components.tokenizer import (
    LLAMA3_PATTERN,
    SentencePieceTokenizer,
    TikTokenizer,
    Tokenizer,
)
from torchtitan.components.tokenizer_training import bytes_to_unicode

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# Llama 3.1 names this id (begin_of_text + 4) <|finetune_right_pad_id|>: the pad of our tiktoken exports.
TIKTOKEN_PAD_TOKEN = "<|reserved_special_token_2|>"


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``: ``path`` is the file or a folder holding it.

    bos/eos/pad, as transformers reads them, first hit wins: ``bos_token``/``eos_token``/``pad_token``
    of tokenizer_config.json, then of special_tokens_map.json (beside the file), then config.json's
    ``*_token_id`` (the first of a list). A missing bos is the token the post-processor prepends,
    else eos (GPT-2 and Qwen end and separate documents with one <|endoftext|>). A missing eos is
    an error: it separates our documents. No pad is pad_id -1.
    """

    def __init__(self, path: str | Path):
        self.file = _tokenizer_file(Path(path))
        try:
            self.model = tokenizers.Tokenizer.from_file(str(self.file))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{self.file} is not a valid Hugging Face tokenizer.json: {reason}") from None
        # Special-token text in documents is ordinary text, as in our tiktoken path; the
        # tokenizer.json's own truncation/padding would silently change every document.
        self.model.encode_special_tokens = True
        self.model.no_truncation()
        self.model.no_padding()
        self._bos_id, self._eos_id, self._pad_id = _special_ids(self.file, self.model)

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        # add_special_tokens=False skips the post-processor (which may add its own bos).
        ids = self.model.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.model.decode(ids, skip_special_tokens=False)

    @property
    def n_words(self) -> int:
        # Added tokens may sit past the model's vocab (or overlap it): the embedding needs max id + 1.
        return max(self.model.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id


def _tokenizer_file(path: Path) -> Path:
    path = path.expanduser()
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"{path} has no {TOKENIZER_FILE}: point tokenizer.path at a Hugging Face folder holding one "
            "(for a folder with only tokenizer.model, at that file)"
        )
    return file


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _configured_id(folder: Path, model: tokenizers.Tokenizer, role: str) -> Optional[int]:
    for name in (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
        token = _read_json(folder / name).get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token  # AddedToken form
        if token:
            token_id = model.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{folder / name}: {role}_token {token!r} is not in the tokenizer's vocabulary")
            return token_id
    token_id = _read_json(folder / "config.json").get(f"{role}_token_id")
    token_id = token_id[0] if isinstance(token_id, list) and token_id else token_id
    return token_id if isinstance(token_id, int) else None


def _template_bos_id(model: tokenizers.Tokenizer) -> Optional[int]:
    """The id of the special token the post-processor's template puts before the text, if any."""
    processor = json.loads(model.post_processor.__getstate__()) if model.post_processor else {}
    templates = processor.get("processors", [processor]) if processor.get("type") == "Sequence" else [processor]
    for template in templates:
        if template.get("type") == "TemplateProcessing" and template["single"]:
            first = template["single"][0].get("SpecialToken")
            if first:
                return model.token_to_id(first["id"])
    return None


def _special_ids(file: Path, model: tokenizers.Tokenizer) -> tuple[int, int, int]:
    folder = file.parent
    eos = _configured_id(folder, model, "eos")
    if eos is None:
        raise ValueError(
            f"{file}: no eos token found: put a {TOKENIZER_CONFIG_FILE} with eos_token (and bos_token) beside it"
        )
    bos = _configured_id(folder, model, "bos")
    bos = _template_bos_id(model) if bos is None else bos
    pad = _configured_id(folder, model, "pad")
    return (eos if bos is None else bos), eos, (-1 if pad is None else pad)


# ----------------------------------------------------------------------------- ours -> tokenizer.json


def _token_str(token: bytes) -> str:
    return "".join(bytes_to_unicode()[b] for b in token)


def tiktoken_to_hf(tokenizer: TikTokenizer) -> tokenizers.Tokenizer:
    """Our tiktoken ranks as an HF byte-level BPE that encodes every text to the same ids."""
    ranks = {tokenizer.model.decode_single_token_bytes(i): i for i in range(tokenizer.num_base_tokens)}
    merges = []
    for token, rank in ranks.items():
        # tiktoken merges any adjacent pair whose concatenation has a rank, lowest rank first:
        # each split of a token into two tokens is a merge at that token's priority.
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    bpe = models.BPE(
        vocab={_token_str(token): rank for token, rank in ranks.items()},
        merges=[(_token_str(left), _token_str(right)) for *_, left, right in merges],
        fuse_unk=False,
        ignore_merges=True,  # tiktoken takes a pre-token that is itself a token whole
    )
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert all(hf.token_to_id(t) == i for t, i in tokenizer.special_tokens.items()), "special ids moved"
    return hf


def sentencepiece_to_hf(tokenizer: SentencePieceTokenizer) -> tokenizers.Tokenizer:
    """A sentencepiece model through transformers' converter, which follows its normalizer spec."""
    try:
        from sentencepiece import sentencepiece_model_pb2
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError as e:
        raise ValueError(
            f"writing a sentencepiece tokenizer as {TOKENIZER_FILE} needs transformers' converter ({e}): "
            "pip install transformers protobuf"
        ) from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model.serialized_model_proto())
    if proto.trainer_spec.model_type != proto.trainer_spec.BPE:
        # HF's Unigram matches control pieces (<s>) in text and breaks Viterbi ties otherwise.
        raise ValueError(
            f"only BPE sentencepiece models (Llama 2's kind) convert to {TOKENIZER_FILE} exactly; this one is "
            f"{proto.trainer_spec.ModelType.Name(proto.trainer_spec.model_type)}"
        )
    if proto.normalizer_spec.precompiled_charsmap:
        logger.warning(
            "this sentencepiece model normalizes text (e.g. nmt_nfkc): HF's Precompiled normalizer differs from "
            "sentencepiece on rare inputs such as '\\r\\n' before spaces; Llama 2's identity rule converts exactly"
        )
    hf = SpmConverter.build_tokenizer_from_spm_proto(proto, {p.piece: i for i, p in enumerate(proto.pieces)})
    control = [p.piece for p in proto.pieces if p.type == p.CONTROL]  # <s>, </s>: decode as their text
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return hf


def to_hf_tokenizer(tokenizer: Tokenizer) -> tokenizers.Tokenizer:
    """``tokenizer`` as a ``tokenizers.Tokenizer`` whose post-processor prepends our bos."""
    if isinstance(tokenizer, HFTokenizer):
        hf = tokenizers.Tokenizer.from_str(tokenizer.model.to_str())
    elif isinstance(tokenizer, TikTokenizer):
        hf = tiktoken_to_hf(tokenizer)
    elif isinstance(tokenizer, SentencePieceTokenizer):
        hf = sentencepiece_to_hf(tokenizer)
    else:
        raise ValueError(f"cannot write a {type(tokenizer).__name__} as {TOKENIZER_FILE}")
    bos = hf.id_to_token(tokenizer.bos_id)
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)]
    )
    # ByteLevel's processor only fixes offsets; Llama 3's file keeps it before the template.
    byte_level = isinstance(hf.decoder, decoders.ByteLevel)
    steps = [processors.ByteLevel(trim_offsets=False), template] if byte_level else [template]
    hf.post_processor = processors.Sequence(steps)
    return hf


def _export_pad_id(tokenizer: Tokenizer) -> int:
    if tokenizer.pad_id < 0 and isinstance(tokenizer, TikTokenizer):
        return tokenizer.special_tokens[TIKTOKEN_PAD_TOKEN]  # reserved, never in our data
    return tokenizer.pad_id


def hf_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """bos/eos/pad ids of the exported tokenizer, for the model's config.json."""
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}
    return {**ids, "pad_token_id": _export_pad_id(tokenizer)} if _export_pad_id(tokenizer) >= 0 else ids


def save_hf_tokenizer(tokenizer: Tokenizer, folder: str | Path, model_max_length: Optional[int] = None) -> Path:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json into ``folder``.

    ``model_max_length``: the context the model was trained for (None: transformers' default).
    """
    hf = to_hf_tokenizer(tokenizer)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    special = {k.removesuffix("_id"): hf.id_to_token(i) for k, i in hf_token_ids(tokenizer).items()}
    source_config = {}
    if isinstance(tokenizer, HFTokenizer):  # keep e.g. a chat template; ours override the rest
        source_config = _read_json(tokenizer.file.parent / TOKENIZER_CONFIG_FILE)
        source_config.pop("added_tokens_decoder", None)  # tokenizer.json holds them
    config = {
        **source_config,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,  # transformers 5 rebuilds the post-processor from these two
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,  # True would rewrite " ." to "." on decode
        "model_input_names": ["input_ids", "attention_mask"],
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    hf.save(str(folder / TOKENIZER_FILE))
    (folder / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
    return folder

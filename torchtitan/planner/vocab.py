"""The vocabulary size a trainer config will train with, known without training a tokenizer.

Training sizes the embedding and the output by ``model.vocab_size`` when it is set, else by the
tokenizer's ``n_words``. The planner and the memory estimator need that number before any run:
a planner that used the flavor's default (2,048 for the debug model) while the embedded tokenizer
has 4,096 tokens under-counted the logits, the largest activation of small models. Only the size
matters here, so a tokenizer file that does not exist yet is no error: the flavor's default is
used and the returned note says so.
"""

from __future__ import annotations

from pathlib import Path

from torchtitan.components.tokenizer import build_tokenizer
from torchtitan.components.tokenizer_training import DEFAULT_VOCAB_SIZE, embedded_tokenizer_path
from torchtitan.models.registry import flavor_error, get_spec


def run_vocab(cfg) -> tuple[int, str]:
    """(vocab size, where it came from, as a note): ``model.vocab_size``; else the tokenizer's: the
    embedded one's (read when cached, else the size it is built with: building it takes minutes), a
    file's; else, when ``tokenizer.path`` does not exist, the flavor's default."""
    m, path = cfg.model, cfg.tokenizer.path
    if m.vocab_size > 0:
        return m.vocab_size, f"vocab {m.vocab_size}: model.vocab_size"
    if not path:
        cached = embedded_tokenizer_path(cfg.tokenizer.cache_dir)
        if cached.exists():
            vocab = build_tokenizer("", cfg.tokenizer.cache_dir).n_words
            return vocab, f"vocab {vocab}: the embedded tokenizer's ({cached})"
        return DEFAULT_VOCAB_SIZE, (f"vocab {DEFAULT_VOCAB_SIZE}: the embedded tokenizer's size (not built yet; "
                                    "the first training run builds it)")
    if Path(path).expanduser().exists():
        vocab = build_tokenizer(path, cfg.tokenizer.cache_dir).n_words
        return vocab, f"vocab {vocab}: the tokenizer's ({path})"
    spec = get_spec(m.name)
    if m.flavor not in spec.flavors:
        raise flavor_error(spec.name, m.flavor, list(spec.flavors))
    vocab = spec.flavors[m.flavor].vocab_size
    return vocab, (f"vocab {vocab}: {m.name} {m.flavor}'s default (tokenizer.path {path!r} does not exist; "
                   f"training uses the tokenizer's size, or set model.vocab_size)")

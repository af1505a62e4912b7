"""Small builders several test files use: a Llama args preset with RoPE scaling, scripts as modules."""

import importlib.util

from torchtitan.models.llama.model import RoPEScalingArgs, TransformerModelArgs
from tests.helpers.runs import REPO


def small_llama_args(**overrides) -> TransformerModelArgs:
    # original_max_position_embeddings=32 < SEQ_LEN: the llama3 scaling changes most frequencies
    # (every wavelength above 8 tokens), so a model that ignored rope_scaling would not match HF.
    kwargs = dict(
        dim=128, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=128,
        rope_scaling=RoPEScalingArgs(factor=8.0, original_max_position_embeddings=32),
    )  # fmt: skip
    kwargs.update(overrides)
    return TransformerModelArgs(**kwargs)


def script_module(name: str):
    """scripts/<name>.py as a module, so its main(argv) runs in-process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module



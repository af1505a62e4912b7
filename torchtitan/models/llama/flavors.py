"""Llama 3 flavors: the published shapes plus small test models, and the builder of args."""

from torchtitan.models.llama.model import RoPEScalingArgs, TransformerModelArgs
from torchtitan.models.registry import args_of_flavor

# Llama 3.2 (1B, 3B) was trained with a 32x context extension, Llama 3.1 (8B-405B) with 8x.
_LLAMA32_SCALING = RoPEScalingArgs(factor=32.0)
_LLAMA31_SCALING = RoPEScalingArgs(factor=8.0)

# vocab_size and max_seq_len are set at build time (tokenizer, training seq_len).
llama3_configs: dict[str, TransformerModelArgs] = {
    # GQA (8 kv heads for 16 query heads) so small runs exercise the repeat-kv path.
    "debugmodel": TransformerModelArgs(dim=256, n_layers=6, n_heads=16, n_kv_heads=8, vocab_size=2048),
    "debugmodel_tiny": TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2048),
    # GPT-2-small-like width/depth with Llama blocks (FFN hidden 2048).
    "125M": TransformerModelArgs(dim=768, n_layers=12, n_heads=12, multiple_of=256),
    "1B": TransformerModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
        ffn_dim_multiplier=1.5, multiple_of=256, rope_scaling=_LLAMA32_SCALING,
    ),
    "3B": TransformerModelArgs(
        dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
        ffn_dim_multiplier=1.0, multiple_of=256, rope_scaling=_LLAMA32_SCALING,
    ),
    "8B": TransformerModelArgs(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        ffn_dim_multiplier=1.3, multiple_of=1024, rope_scaling=_LLAMA31_SCALING,
    ),
    "70B": TransformerModelArgs(
        dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
        ffn_dim_multiplier=1.3, multiple_of=4096, rope_scaling=_LLAMA31_SCALING,
    ),
    "405B": TransformerModelArgs(
        dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
        ffn_dim_multiplier=1.2, multiple_of=4096, rope_scaling=_LLAMA31_SCALING,
    ),
}  # fmt: skip


def build_model_args(
    flavor: str, vocab_size: int, max_seq_len: int, n_layers: int = 0, dim: int = 0, n_kv_heads: int = 0,
    attention_backend: str = "auto",
) -> TransformerModelArgs:
    """Args of `flavor` with the tokenizer's vocab, the training seq_len and overrides (0 = keep)."""
    args = args_of_flavor("llama3", llama3_configs, flavor, vocab_size, max_seq_len, n_layers, dim, n_kv_heads, attention_backend)
    return args

"""Qwen3 flavors: the published shapes (Qwen/Qwen3-* config.json) plus small test models, and the builder of args."""

from dataclasses import replace

from torchtitan.models.moe import MoEArgs
from torchtitan.models.qwen3.model import Qwen3ModelArgs
from torchtitan.models.registry import args_of_flavor


def _published_moe(hidden_dim: int) -> MoEArgs:
    """Qwen3 MoE routing: softmax over 128 experts, top 8, renormalized, no shared experts."""
    return MoEArgs(num_experts=128, top_k=8, hidden_dim=hidden_dim, score_func="softmax", norm_topk_prob=True)


_TINY_MOE = MoEArgs(num_experts=8, top_k=2, hidden_dim=64, score_func="softmax", norm_topk_prob=True)
_DEBUG_MOE = MoEArgs(num_experts=8, top_k=2, hidden_dim=256, score_func="softmax", norm_topk_prob=True)

_DEBUG = dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32, hidden_dim=512, vocab_size=2048)
# dim, heads, kv heads, hidden all divide by tp=2 (multi-process tests).
_TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, vocab_size=2048)

# vocab_size (151936 for the published models) is overwritten by the tokenizer and max_seq_len
# by the training seq_len at build time.
qwen3_configs: dict[str, Qwen3ModelArgs] = {
    "debugmodel": Qwen3ModelArgs(**_DEBUG),
    "debugmodel_moe": Qwen3ModelArgs(**_DEBUG, moe=_DEBUG_MOE),
    "debugmodel_tiny": Qwen3ModelArgs(**_TINY),
    "debugmodel_moe_tiny": Qwen3ModelArgs(**_TINY, moe=_TINY_MOE),
    "0.6B": Qwen3ModelArgs(
        dim=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=3072, tie_word_embeddings=True,
    ),
    "1.7B": Qwen3ModelArgs(
        dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128, hidden_dim=6144, tie_word_embeddings=True,
    ),
    "4B": Qwen3ModelArgs(
        dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=9728, tie_word_embeddings=True,
    ),
    "8B": Qwen3ModelArgs(dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128, hidden_dim=12288),
    "14B": Qwen3ModelArgs(dim=5120, n_layers=40, n_heads=40, n_kv_heads=8, head_dim=128, hidden_dim=17408),
    "32B": Qwen3ModelArgs(dim=5120, n_layers=64, n_heads=64, n_kv_heads=8, head_dim=128, hidden_dim=25600),
    "30B-A3B": Qwen3ModelArgs(
        dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, hidden_dim=6144, moe=_published_moe(768),
    ),
    "235B-A22B": Qwen3ModelArgs(
        dim=4096, n_layers=94, n_heads=64, n_kv_heads=4, head_dim=128, hidden_dim=12288, moe=_published_moe(1536),
    ),
}  # fmt: skip


def build_model_args(
    flavor: str, vocab_size: int, max_seq_len: int, n_layers: int = 0, dim: int = 0, n_kv_heads: int = 0,
    attention_backend: str = "auto",
) -> Qwen3ModelArgs:
    """Args of `flavor` with the tokenizer's vocab, the training seq_len and overrides (0 = keep)."""
    args = args_of_flavor("qwen3", qwen3_configs, flavor, vocab_size, max_seq_len, n_layers, dim, n_kv_heads, attention_backend)
    if args.moe is not None:
        args.moe = replace(args.moe)  # a copy: the flavor's own MoEArgs stay untouched
    return args

"""The training loss: token cross-entropy in fp32, in chunks of tokens when the logits are bf16.

Why chunks: with a 128K vocabulary, 8K tokens of logits are 1G values. bf16 logits are 2 GiB;
upcast to fp32 for an accurate log-softmax they would be 4 GiB more, plus the fp32 log-softmax
autograd keeps for backward (4 GiB). Here each chunk of ``chunk_tokens`` rows is upcast,
reduced to a sum and dropped; backward recomputes one chunk at a time (activation
checkpointing of the loss alone), so fp32 logits never exist at full size. The cost is one
extra log-softmax per chunk in backward, small next to the output projection's matmul.

fp32 logits (CPU runs, or training in fp32) need no upcast and take the one-shot path, as do
vocab-sharded DTensor logits under TP loss_parallel (already 1/tp of the vocab per rank).
"""

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint


def _sum_ce_fp32(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_NV.float(), labels_N, reduction="sum")


def cross_entropy(logits_BTV: torch.Tensor, labels_BT: torch.Tensor, chunk_tokens: int = 0) -> torch.Tensor:
    """Mean cross-entropy over all tokens, computed in fp32 whatever the logits' dtype.

    ``chunk_tokens > 0``: low-precision logits go through in chunks of that many tokens.
    """
    logits_NV, labels_N = logits_BTV.flatten(0, 1), labels_BT.flatten(0, 1)
    n_tokens = labels_N.numel()
    if (chunk_tokens <= 0 or n_tokens <= chunk_tokens or logits_NV.dtype == torch.float32
            or isinstance(logits_NV, DTensor)):
        return F.cross_entropy(logits_NV.float(), labels_N)
    total = logits_NV.new_zeros((), dtype=torch.float32)
    for logits_chunk, labels_chunk in zip(logits_NV.split(chunk_tokens), labels_N.split(chunk_tokens)):
        total = total + checkpoint(_sum_ce_fp32, logits_chunk, labels_chunk, use_reentrant=False)
    return total / n_tokens

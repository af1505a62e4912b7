"""Chunked fp32 cross-entropy: the same loss and gradients as the one-shot fp32 loss, and no
fp32 tensor the size of the full logits, neither in forward nor saved for backward."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan.components.loss import cross_entropy

B, T, V = 2, 40, 96


class LargestFp32(TorchDispatchMode):
    """Records the most elements of any fp32 tensor an op produced."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def logits_and_labels(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(B, T, V)).to(dtype).requires_grad_()
    return logits, torch.randint(0, V, (B, T))


@pytest.mark.parametrize("chunk", [16, 25, 80])
def test_chunked_matches_one_shot_fp32(chunk):
    logits, labels = logits_and_labels(torch.bfloat16)
    ref_logits = logits.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.float().flatten(0, 1), labels.flatten())
    ref.backward()
    loss = cross_entropy(logits, labels, chunk_tokens=chunk)
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits.grad, ref_logits.grad)  # both bf16: the same rounding of fp32 grads


def test_full_size_fp32_logits_never_exist():
    logits, labels = logits_and_labels(torch.bfloat16)
    with LargestFp32() as one_shot:
        cross_entropy(logits, labels, chunk_tokens=0).backward()
    assert one_shot.largest >= B * T * V  # the property is observable: the one-shot path upcasts all
    logits.grad = None
    with LargestFp32() as chunked:
        cross_entropy(logits, labels, chunk_tokens=16).backward()
    assert chunked.largest <= 16 * V


def test_fp32_logits_take_the_one_shot_path():
    logits, labels = logits_and_labels(torch.float32)
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    assert torch.equal(cross_entropy(logits, labels, chunk_tokens=16), ref)

"""Autoregressive generation with a KV cache, batched prompts, sampling, eos stops; also under TP.

    tokens = generate(im, prompts, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                      use_cache=True, eos_id=None, stats=None) -> list[list[int]]

(scripts/generate.py and scripts/eval.py build on this; keep the name and the signature.)

- ``prompts``: token ids per row (bos included if wanted); rows may differ in length. The batch is
  right-padded and every token carries its RoPE position, so a row computes what it computes alone
  (kv_cache.py says why padding changes no number).
- Returns each row's new tokens, without the prompt and without the eos that ended the row.
  A row stops at ``eos_id`` (default: the tokenizer's; -1 = never) or after ``max_new_tokens``, or
  at the model's context (prompt + completion <= max_seq_len).
- ``temperature == 0``: greedy (argmax). Else softmax(logits / temperature) after ``top_k`` (0 = off)
  and nucleus ``top_p`` (1 = off) filtering, drawn from a ``torch.Generator`` seeded with ``seed``.
  Under TP the logits are all-gathered (replicated) and every rank seeds the same generator, so
  every rank draws the same token without a broadcast.
- ``use_cache=False`` recomputes the whole sequence at every step (the reference the cache must equal).
- ``stats`` (a ``GenerationStats``) is filled with the token counts and the prefill / decode times.
"""

import time
from dataclasses import dataclass
from typing import Optional

import torch

from torchtitan.inference.kv_cache import kv_cache
from torchtitan.inference.loading import InferenceModel
from torchtitan.tools.logging import logger


@dataclass
class GenerationStats:
    prompt_tokens: int = 0  # all rows, without padding
    new_tokens: int = 0  # all rows; the first of each row comes from the prefill
    decode_tokens: int = 0  # new tokens made by decode steps (after the prefill)
    decode_steps: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0


def sample(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token id per row [B] from logits [B, V] (see the module docstring)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = sorted_BV.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the top one stays).
        drop_BV = probs_BV.cumsum(dim=-1) - probs_BV > top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _check_request(prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   max_seq_len: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (an empty prompt has nothing to continue)")
    if max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"sampling needs --temperature >= 0 (0 = greedy), --top_k >= 0 (0 = off) and 0 < --top_p <= 1; "
            f"got temperature={temperature}, top_k={top_k}, top_p={top_p}"
        )
    for i, p in enumerate(prompts):
        if len(p) >= max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens but the model's context is {max_seq_len} (max_seq_len: the "
                f"training seq_len): shorten the prompt, or pass --max_seq_len to load with a longer context"
            )


class _Rows:
    """Per-row bookkeeping on the host: new tokens, whether done, how many more fit."""

    def __init__(self, prompts: list[list[int]], max_new_tokens: int, max_seq_len: int, eos_id: int):
        self.lengths = [len(p) for p in prompts]
        self.budget = [min(max_new_tokens, max_seq_len - n) for n in self.lengths]
        self.out: list[list[int]] = [[] for _ in prompts]
        self.done = [False] * len(prompts)
        self.eos_id = eos_id
        self.last: Optional[torch.Tensor] = None  # [B] the tokens sampled last, on the device

    def add(self, tokens: list[int]) -> int:
        """Record one sampled token per row; returns how many rows took one."""
        taken = 0
        for b, t in enumerate(tokens):
            if self.done[b]:
                continue
            if t == self.eos_id:
                self.done[b] = True
                continue
            self.out[b].append(t)
            taken += 1
            self.done[b] = len(self.out[b]) >= self.budget[b]
        return taken

    def positions(self) -> list[int]:
        """The position of each row's last token (a done row stays where it stopped)."""
        return [n + max(len(o) - 1, 0) for n, o in zip(self.lengths, self.out)]


def _right_padded(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        padded[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return padded.to(device)


def _last_logits(logits_BTV: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Each row's logits at its last real token [B, V]."""
    index_B = torch.tensor([n - 1 for n in lengths], device=logits_BTV.device)
    return logits_BTV[torch.arange(len(lengths), device=logits_BTV.device), index_B]


def generate(im: InferenceModel, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             eos_id: Optional[int] = None, stats: Optional[GenerationStats] = None) -> list[list[int]]:
    """New tokens per prompt (see the module docstring)."""
    _check_request(prompts, max_new_tokens, temperature, top_k, top_p, im.max_seq_len)
    if eos_id is None:
        eos_id = im.tokenizer.eos_id if im.tokenizer is not None else -1
    rows = _Rows(prompts, max_new_tokens, im.max_seq_len, eos_id)
    if min(rows.budget) < max_new_tokens:
        logger.warning(f"generation stops at the model's context of {im.max_seq_len} tokens (prompt + completion)")
    generator = torch.Generator(device=im.device).manual_seed(seed) if temperature > 0 else None
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = sum(rows.lengths)
    cache_len = max(n + b for n, b in zip(rows.lengths, rows.budget))
    with torch.no_grad():
        if use_cache:
            with kv_cache(im.model, len(prompts), cache_len):
                _decode(im, prompts, rows, lambda: _cached_step(im, rows), (temperature, top_k, top_p), generator,
                        stats)
        else:
            _decode(im, prompts, rows, lambda: _recompute_step(im, prompts, rows), (temperature, top_k, top_p),
                    generator, stats)
    return rows.out


def _decode(im: InferenceModel, prompts, rows: _Rows, step, sampling: tuple, generator, stats: GenerationStats):
    """Prefill, then one step per new token until every row is done; times both phases."""
    start = time.perf_counter()
    tokens_BT = _right_padded(prompts, im.device)
    positions_BT = torch.arange(tokens_BT.shape[1], device=im.device).expand_as(tokens_BT)
    logits_BV = _last_logits(im.model(tokens_BT, positions=positions_BT), rows.lengths)
    rows.last = sample(logits_BV, *sampling, generator)
    stats.new_tokens = rows.add(rows.last.tolist())  # .tolist() syncs: the timing below is honest
    stats.prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    while not all(rows.done):
        logits_BV = step()
        rows.last = sample(logits_BV, *sampling, generator)
        made = rows.add(rows.last.tolist())
        stats.decode_tokens += made
        stats.decode_steps += 1
    stats.new_tokens += stats.decode_tokens
    stats.decode_seconds = time.perf_counter() - start


def _cached_step(im: InferenceModel, rows: _Rows) -> torch.Tensor:
    """Feed each row's last sampled token at its position; the cache holds the rest."""
    positions_B1 = torch.tensor(rows.positions(), device=im.device)[:, None]
    return im.model(rows.last[:, None], positions=positions_B1)[:, -1]


def _recompute_step(im: InferenceModel, prompts, rows: _Rows) -> torch.Tensor:
    """The whole sequence again (no cache): prompt + new tokens per row, right-padded, plain causal."""
    seqs = [p + o for p, o in zip(prompts, rows.out)]
    return _last_logits(im.model(_right_padded(seqs, im.device)), [len(s) for s in seqs])

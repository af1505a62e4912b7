"""Our model as an lm-evaluation-harness ``LM``: loglikelihood, loglikelihood_rolling, generate_until.

Everything that decides a number follows lm-eval's own ``hf`` backend (``HFLM``) run on our exported
Hugging Face folder, whose tokenizer prepends bos as ours does at training, so per-request
loglikelihoods equal HFLM's (tests/e2e/test_eval.py):

- text is encoded with bos prepended, except a string that starts with the bos text (which, as in
  training data, stays text);
- ``TemplateLM.loglikelihood`` splits context and continuation (encode context + continuation, cut at
  the context's token count; trailing spaces of the context move into the continuation) and
  conditions an empty context on bos alone;
- an input longer than ``max_seq_len + 1`` tokens loses its oldest tokens;
- ``loglikelihood_rolling`` scores ``lm_eval.utils.get_rolling_token_windows`` windows of
  ``max_seq_len`` tokens with bos as the prefix token. HFLM encodes the document itself with its bos
  too, so the first window also scores that bos after the prefix bos (lm-eval issue #3333); kept, so
  perplexities compare with HFLM's;
- generation left-truncates the prompt to ``max_seq_len - max_gen_toks``, decodes without special
  tokens and cuts the text at the first stop string (``until``, plus the eos text).

Requests are sorted longest first (lm-eval's ``Collator``), batched ``batch_size`` at a time and
right-padded (causal attention: padding after a sequence never changes its logits); rows of a
batch with identical inputs (the choices of a multiple-choice question whose answers are one
token) run once.
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from torchtitan.components.hf_tokenizer import HFTokenizer
from torchtitan.components.tokenizer import TikTokenizer, Tokenizer
from torchtitan.inference.generate import generate
from torchtitan.inference.loading import InferenceModel

# fn(prompts, max_new_tokens, *, temperature, top_k, top_p, seed) -> each prompt's new tokens, without
# the eos that ended it: torchtitan.inference.generate.generate with the model bound.
GenerateFn = Callable[..., list[list[int]]]

# A request as TemplateLM hands it over: ((context, continuation) or None, context ids, continuation ids).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


def special_ids(tokenizer: Tokenizer) -> set[int]:
    """Ids that generated text leaves out (as HFLM decodes with ``skip_special_tokens=True``)."""
    ids = {tokenizer.bos_id, tokenizer.eos_id}
    if isinstance(tokenizer, TikTokenizer):  # the 256 reserved tokens
        ids |= set(tokenizer.special_tokens.values())
    elif isinstance(tokenizer, HFTokenizer):
        ids |= {i for i, token in tokenizer.model.get_added_tokens_decoder().items() if token.special}
    return ids


class TorchTitanLM(TemplateLM):
    """An lm-eval ``LM`` over ``model(tokens_BT) -> logits_BTV`` and one of our tokenizers."""

    def __init__(
        self,
        model: Callable[[torch.Tensor], torch.Tensor],
        tokenizer: Tokenizer,
        max_seq_len: int,
        *,
        batch_size: int = 1,
        device: torch.device | str | None = None,
        generate_fn: GenerateFn | None = None,
        max_gen_toks: int = 256,
        gen_chunk_tokens: int = 32,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1 or max_seq_len < 2 or gen_chunk_tokens < 1:
            raise ValueError(f"batch_size ({batch_size}), max_seq_len ({max_seq_len}) and gen_chunk_tokens "
                             f"({gen_chunk_tokens}) must be >= 1, >= 2 and >= 1")
        self.model, self.tok, self.generate_fn = model, tokenizer, generate_fn
        self._max_length, self._batch_size, self._max_gen_toks = max_seq_len, batch_size, max_gen_toks
        # Generation runs gen_chunk_tokens at a time and stops once a stop string appeared: a
        # one-line answer does not pay for max_gen_toks tokens.
        self.gen_chunk_tokens, self.seed = gen_chunk_tokens, seed
        if device is None:
            param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
            device = param.device if param is not None else "cpu"
        self._device = torch.device(device)
        self._bos_text = tokenizer.decode([tokenizer.bos_id])
        self._special_ids = special_ids(tokenizer)

    @classmethod
    def from_inference_model(cls, im: InferenceModel, **kwargs) -> "TorchTitanLM":
        """From ``load_for_inference``'s ``InferenceModel``; generation through ``inference.generate``."""
        if im.tokenizer is None:
            raise ValueError(f"{im.source} names no tokenizer: pass the one it was trained with (--tokenizer)")

        def generate_fn(prompts, max_new_tokens, temperature, top_k, top_p, seed):
            return generate(im, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

        return cls(im.model, im.tokenizer, im.max_seq_len, device=im.device, generate_fn=generate_fn, **kwargs)

    # ------------------------------------------------------------------------- what lm-eval asks

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id  # what an empty context and the first rolling window condition on (as HFLM)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """bos + ids (``add_special_tokens=None`` or True), ids only (False), as HFLM with our export."""
        bos = add_special_tokens is not False
        if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
            # HFLM then adds no special tokens, and the export's tokenizer (split_special_tokens, as
            # training) reads the bos text as ordinary text: so does ours.
            bos = False
        return self.tok.encode(string, bos=bos, eos=False)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self._special_ids])

    # ------------------------------------------------------------------------- scoring

    @torch.inference_mode()
    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """logits_BTV of right-padded rows (padding after a row never changes its causal logits)."""
        width = max(len(r) for r in rows)
        tokens_BT = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens_BT[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return self.model(tokens_BT.to(self._device))

    def _loglikelihood_tokens(self, requests: list[TokenRequest],
                              disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding gives the continuation) per request."""

        def longest_first(req: TokenRequest):
            tokens = req[1] + req[2]
            return -len(tokens), tuple(tokens)

        collator = Collator(requests, sort_fn=longest_first)
        results = []
        for chunk in tqdm(collator.get_batched(n=self.batch_size), disable=disable_tqdm,
                          desc="loglikelihood batches"):
            inputs = [self._window(ctx, cont) for _, ctx, cont in chunk]
            unique: dict[tuple[int, ...], int] = {}
            row_of = [unique.setdefault(tuple(inp), len(unique)) for inp in inputs]
            logits_BTV = self._logits([list(r) for r in unique])
            for (request, _, cont), inp, row in zip(chunk, inputs, row_of):
                results.append(self._score(logits_BTV[row, len(inp) - len(cont) : len(inp)], cont))
                if request is not None:  # None: a rolling window, cached per document instead
                    self.cache_hook.add_partial("loglikelihood", request, results[-1])
        return collator.get_original(results)

    def _window(self, context: list[int], continuation: list[int]) -> list[int]:
        """The model input scoring ``continuation``: the last max_seq_len tokens before its last token."""
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs a non-empty context and continuation")
        if len(continuation) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens does not fit max_seq_len {self.max_length}"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1]

    @staticmethod
    def _score(logits_TV: torch.Tensor, continuation: list[int]) -> tuple[float, bool]:
        logprobs_TV = F.log_softmax(logits_TV.float(), dim=-1)  # fp32 whatever the model's dtype
        target_T = torch.tensor(continuation, device=logits_TV.device)
        is_greedy = bool((logprobs_TV.argmax(dim=-1) == target_T).all())
        return float(logprobs_TV.gather(1, target_T[:, None]).sum()), is_greedy

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document loglikelihoods, in max_seq_len windows that each predict new tokens only."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for ctx, cont in map(lm_utils.make_disjoint_window, rolling):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text up to (without) the first stop string, at most max_gen_toks tokens."""
        if self.generate_fn is None:
            raise ValueError("generate_until needs a generation function: build the LM with "
                             "TorchTitanLM.from_inference_model(...) or pass generate_fn")
        collator = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                            group_by="gen_kwargs", group_fn=lambda r: r[1])
        results = []
        for chunk in tqdm(collator.get_batched(n=self.batch_size), disable=disable_tqdm, desc="generate batches"):
            contexts, all_kwargs = zip(*chunk)
            texts = self._generate_batch(list(contexts), all_kwargs[0])  # a batch shares its gen_kwargs
            for context, text in zip(contexts, texts):
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
            results.extend(texts)
        return collator.get_original(results)

    def _generate_batch(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.decode([self.eot_token_id]))
        max_gen_toks = kwargs.pop("max_gen_toks")
        if max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks {max_gen_toks} must be smaller than max_seq_len {self.max_length}: "
                             "set max_gen_toks in the task's generation_kwargs")
        sample = functools.partial(
            self.generate_fn,
            temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
            top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
        )
        prompts = [self.tok_encode(c)[-(self.max_length - max_gen_toks) :] for c in contexts]
        new_tokens = self._generate_until_stopped(prompts, until, max_gen_toks, sample)
        return [postprocess_generated_text(self.tok_decode(t), stop=until, think_end_token=None) for t in new_tokens]

    def _generate_until_stopped(self, prompts: list[list[int]], until: list[str], max_gen_toks: int,
                                sample: GenerateFn) -> list[list[int]]:
        """New tokens per prompt, generated gen_chunk_tokens at a time until eos, a stop string or the budget."""
        new = [[] for _ in prompts]
        active, step = list(range(len(prompts))), 0
        while active:
            n = min(self.gen_chunk_tokens, max_gen_toks - len(new[active[0]]))  # active rows are equally long
            outs = sample([prompts[i] + new[i] for i in active], n, seed=self.seed + step)
            still = []
            for i, out in zip(active, outs):
                new[i].extend(out)
                ended = len(out) < n or len(new[i]) >= max_gen_toks  # fewer than asked: eos came
                if not ended and not any(s and s in self.tok_decode(new[i]) for s in until):
                    still.append(i)
            active, step = still, step + 1
        return new

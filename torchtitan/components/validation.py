"""Validation during training: the loss on held-out data, between two optimizer steps.

What is evaluated. Without ``validation.datasets``, the held-out split of each training source
(``data.val_fraction`` of the stdlib files and of local documents, a hub dataset's own
``validation`` split; see ``datasets/sources.py``); else the named data: ``stdlib``, local
files/folders read whole, or ``hf:<repo>[:<config>][@<split>]``. Each source gets its own
loader, built by ``build_dataloader`` like the training one (same packing, positions and
documents) but unshuffled, without workers and reading its data once. Every evaluation restarts
it from the beginning, so it sees the same sequences each time and the losses of two steps
compare. An evaluation covers the first ``steps`` batches of each source, or every complete
batch with ``steps = -1`` (the split's final partial batch and partial sequence are left out:
every rank must run the same forwards). A batch is ``local_batch_size x dp`` sequences; rank
``r`` takes its rows as in training.

What is logged: one token-weighted mean over every evaluated token (``val_loss``) and its
``exp`` (``val_perplexity``), plus ``val_loss/<name>`` per source when there are several. Each
rank sums its tokens' cross-entropy and counts them; one all-reduce over all ranks adds both
(tensor-parallel copies of a token count in both sums alike, pipeline ranks without the last
stage add zeros), so the value does not depend on the layout.

What it must not touch (training stays bit-for-bit the same with and without validation): the
training loader (a loader of its own), any RNG (forked: creating a DataLoader iterator draws
from torch's), the train mode of the model (restored), gradients (``no_grad``; none exist
between steps anyway) and the MoE routing counts (the evaluation's are dropped: it runs after
``MoEMonitor.after_step`` took the step's).

Pipeline parallel: the schedule's forward-only ``eval()`` (torch 2.11 and 2.13), which needs the
training local batch (the stages' shapes are fixed). Two cases evaluate stage by stage instead
(``StageByStageForward``, no overlap between stages): two consecutive stages on one rank
(V-shaped schedules, some CSV ones), where torch 2.13's ``eval()`` fails ("can't
steal_bwd_input"); and MoE models, because on torch 2.13 each switch between ``eval`` and
``step`` re-runs torch's shape inference, an extra forward of the next training step's first
microbatch that the routing counts, hence the balancing bias, would see (dense models do not
feel it: their losses stay bit-for-bit the same).
"""

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule

from torchtitan.components.metrics import perplexity
from torchtitan.components.train_step import ForwardBackward, plain_loss
from torchtitan.config.job_config import Data as DataConfig
from torchtitan.config.job_config import Validation as ValidationConfig
from torchtitan.datasets.dataloader import DistributedDataLoader, build_dataloader
from torchtitan.datasets.sources import HF_ALIASES, EndOfSplit
from torchtitan.models.moe import moe_modules
from torchtitan.parallelisms.parallel_dims import ParallelDims
from torchtitan.tools.logging import logger

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_HEADER = 8  # dtype code, ndim, up to 6 dims


class StageByStageForward:
    """Forward-only pipeline evaluation in one global order: microbatch by microbatch, stage 0,
    1, ..., each on the rank that holds it, activations sent point to point (a shape header,
    then the tensor). Every rank walks the same order and every send is matched by the very next
    operation of that order, so it cannot deadlock on any backend; stages do not overlap (slower
    than a pipelined schedule), which is why it only stands in where torch's ``eval()`` fails."""

    def __init__(self, step_fn: ForwardBackward, pp_group, rank_of: dict[int, int]):
        pipe = step_fn.built.pipeline
        self.step_fn, self.group, self.rank_of = step_fn, pp_group, rank_of
        self.me = torch.distributed.get_rank(pp_group)
        self.parts = dict(zip(pipe.stage_ids, pipe.model_parts))
        self.num_stages, self.n_micro = pipe.num_stages, pipe.n_microbatches

    @staticmethod
    def stage_ranks(stage_ids: tuple[int, ...], pp_group) -> dict[int, int]:
        """stage -> rank in the pp group, for every stage (collective over the pp group)."""
        every = [None] * torch.distributed.get_world_size(pp_group)
        torch.distributed.all_gather_object(every, tuple(stage_ids), group=pp_group)
        return {stage: rank for rank, stages in enumerate(every) for stage in stages}

    @staticmethod
    def needed(rank_of: dict[int, int]) -> bool:
        return any(rank_of[s] == rank_of[s + 1] for s in range(len(rank_of) - 1))

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``ForwardBackward.evaluate``."""
        fb = self.step_fn
        inputs, labels, kwargs, cp_context = fb.model_inputs(batch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=fb.device)
        n_tokens = 0
        n = min(self.n_micro, inputs.shape[0])
        micro_inputs, micro_labels = inputs.tensor_split(n), labels.tensor_split(n)
        micro_kwargs = [{k: v.tensor_split(n)[i] for k, v in kwargs.items()} for i in range(n)]
        with torch.no_grad(), cp_context:
            for i in range(n):
                x = micro_inputs[i]
                for stage in range(self.num_stages):
                    if self.rank_of[stage] != self.me:
                        continue
                    if stage > 0 and self.rank_of[stage - 1] != self.me:
                        x = self._recv(self.rank_of[stage - 1])
                    with fb.autocast:
                        x = self.parts[stage](x, **micro_kwargs[i])
                    if stage == self.num_stages - 1:
                        with fb.loss_context():
                            mean = plain_loss(fb.loss_fn(x, micro_labels[i]))
                        loss_sum += mean.double() * micro_labels[i].numel()
                        n_tokens += micro_labels[i].numel()
                    elif self.rank_of[stage + 1] != self.me:
                        self._send(x, self.rank_of[stage + 1])
        return loss_sum, torch.tensor(float(n_tokens), dtype=torch.float64, device=fb.device)

    def _send(self, x: torch.Tensor, to: int) -> None:
        assert x.dim() <= _HEADER - 2 and x.dtype in _DTYPES, (x.shape, x.dtype)
        header = [_DTYPES.index(x.dtype), x.dim(), *x.shape] + [0] * (_HEADER - 2 - x.dim())
        dst = torch.distributed.get_global_rank(self.group, to)
        torch.distributed.send(torch.tensor(header, device=x.device), dst, group=self.group)
        torch.distributed.send(x.contiguous(), dst, group=self.group)

    def _recv(self, source: int) -> torch.Tensor:
        src = torch.distributed.get_global_rank(self.group, source)
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.step_fn.device)
        torch.distributed.recv(header, src, group=self.group)
        code, ndim, *shape = header.tolist()
        x = torch.empty(shape[:ndim], dtype=_DTYPES[code], device=self.step_fn.device)
        torch.distributed.recv(x, src, group=self.group)
        return x


@dataclass
class ValidationSource:
    name: str
    loader: DistributedDataLoader
    start: dict  # the loader's state before its first batch: every evaluation starts there


def check_config(cfg: ValidationConfig, train_local_bs: int, pp_enabled: bool) -> int:
    """The local validation batch; a ValueError naming the key for a bad value."""
    if cfg.freq < 1:
        raise ValueError(
            f"validation.freq={cfg.freq} must be a positive number of steps when validation.enable is true; "
            f"e.g. --validation.freq 100"
        )
    if cfg.steps == 0 or cfg.steps < -1:
        raise ValueError(f"validation.steps={cfg.steps} must be a positive number of batches, or -1 for all")
    if cfg.local_batch_size == 0 or cfg.local_batch_size < -1:
        raise ValueError(
            f"validation.local_batch_size={cfg.local_batch_size} must be positive, or -1 for training's local batch"
        )
    local_bs = train_local_bs if cfg.local_batch_size == -1 else cfg.local_batch_size
    if pp_enabled and local_bs != train_local_bs:
        raise ValueError(
            f"validation.local_batch_size={local_bs} differs from the training local batch {train_local_bs}: under "
            f"PP the schedule's microbatch shapes are fixed by training; use -1"
        )
    return local_bs


def source_names(specs: list[str]) -> list[str]:
    """Short names for ``val_loss/<name>``: the alias, the hub repo, or the file/folder name
    (the whole spec where two would clash)."""

    def short(spec: str) -> str:
        if spec == "stdlib" or spec in HF_ALIASES:
            return spec
        if spec.startswith("hf:"):
            return spec[len("hf:"):]
        return Path(spec).expanduser().name or spec

    names = [short(s) for s in specs]
    return [n if names.count(n) == 1 else s for n, s in zip(names, specs)]


class Validator:
    """Built once at start-up (each source's first batch is read then, so a bad path or a split
    too small for one batch fails before training); ``run()`` is collective: every rank calls it."""

    def __init__(self, cfg: ValidationConfig, data_cfg: DataConfig, tokenizer, seq_len: int,
                 parallel_dims: ParallelDims, step_fn: ForwardBackward, model_parts: list[nn.Module],
                 device: torch.device, train_local_bs: int):
        self.cfg, self.step_fn, self.model_parts, self.device = cfg, step_fn, model_parts, device
        self.tp = parallel_dims.tp  # every token is counted once per tensor-parallel rank
        self.local_bs = check_config(cfg, train_local_bs, parallel_dims.pp_enabled)
        self.forward = step_fn.evaluate
        if parallel_dims.pp_enabled:
            pp_group = parallel_dims.submesh("pp").get_group()
            rank_of = StageByStageForward.stage_ranks(step_fn.built.pipeline.stage_ids, pp_group)
            if StageByStageForward.needed(rank_of) or getattr(step_fn.built.args, "moe", None) is not None:
                self.forward = StageByStageForward(step_fn, pp_group, rank_of)
        self.global_bs = self.local_bs * parallel_dims.dp
        explicit = bool(cfg.datasets)
        specs = list(cfg.datasets) or list(data_cfg.datasets)
        self.sources = []
        for spec, name in zip(specs, source_names(specs)):
            loader = self._build_loader(spec, explicit, data_cfg, tokenizer, seq_len, parallel_dims)
            self.sources.append(ValidationSource(name, loader, loader.state_dict()))
        with self._rng_forked():
            for source in self.sources:
                self._check_first_batch(source, seq_len)
        what = "every complete batch" if cfg.steps == -1 else f"{cfg.steps} batches"
        logger.info(f"validation every {cfg.freq} steps on {[s.name for s in self.sources]}: {what} of "
                    f"{self.global_bs} sequences (local {self.local_bs})")

    def _build_loader(self, spec: str, explicit: bool, data_cfg: DataConfig, tokenizer, seq_len: int,
                      parallel_dims: ParallelDims) -> DistributedDataLoader:
        local = not (spec == "stdlib" or spec in HF_ALIASES or spec.startswith("hf:"))
        val_cfg = dataclasses.replace(
            data_cfg, datasets=[spec], weights=[], shuffle_windows=0, num_workers=0,
            # A local file named in validation.datasets is validation data: every document is held out.
            val_fraction=1.0 if explicit and local else data_cfg.val_fraction,
        )
        try:
            return build_dataloader(val_cfg, tokenizer, seq_len, self.global_bs, parallel_dims.dp_rank,
                                    parallel_dims.dp, split="validation", device_type=self.device.type)
        except ValueError as e:
            if not explicit:
                raise
            raise ValueError(f"validation.datasets entry {spec!r}: {e}") from None

    def _check_first_batch(self, source: ValidationSource, seq_len: int) -> None:
        try:
            next(source.loader)
        except EndOfSplit:
            raise ValueError(
                f"validation data {source.name!r} holds fewer than one batch of {self.global_bs} sequences of "
                f"seq_len+1 = {seq_len + 1} tokens (validation.local_batch_size {self.local_bs} x dp); lower "
                f"validation.local_batch_size, raise data.val_fraction or add data"
            ) from None

    def should_run(self, step: int, last_step: int) -> bool:
        return step % self.cfg.freq == 0 or step == last_step

    def run(self) -> dict[str, float]:
        """Evaluate every source: ``val_loss``, ``val_perplexity``, ``val_loss/<name>`` (several
        sources), ``val_tokens`` (distinct tokens evaluated) and ``val_seconds``. One host sync."""
        t0 = time.perf_counter()
        totals = torch.zeros(len(self.sources), 2, dtype=torch.float64, device=self.device)
        with self._rng_forked(), self._eval_mode(), self._routing_counts_dropped(), torch.no_grad():
            for i, source in enumerate(self.sources):
                totals[i] = self._evaluate(source)
        self._reshard()
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(totals)  # one collective for every source
        (loss_sum, n_tokens), per_source = totals.sum(dim=0).tolist(), totals.tolist()
        val_loss = loss_sum / n_tokens
        values = {"val_loss": val_loss, "val_perplexity": perplexity(val_loss)}
        if len(self.sources) > 1:
            values.update({f"val_loss/{s.name}": ls / n for s, (ls, n) in zip(self.sources, per_source)})
        values["val_tokens"] = int(round(n_tokens / self.tp))
        values["val_seconds"] = time.perf_counter() - t0
        return values

    def _evaluate(self, source: ValidationSource) -> torch.Tensor:
        """[loss sum, token count] of this rank over the source's first batches."""
        source.loader.load_state_dict(source.start)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        n_tokens = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = 0
        while self.cfg.steps == -1 or batches < self.cfg.steps:
            try:  # every rank reads the same stream: all reach its end at the same batch
                batch = next(source.loader)
            except EndOfSplit:
                break
            batch_loss, batch_tokens = self.forward(batch)
            loss_sum += batch_loss
            n_tokens += batch_tokens
            batches += 1
        return torch.stack([loss_sum, n_tokens])

    def _rng_forked(self):
        # A DataLoader iterator seeds itself from torch's global generator; training must not see that.
        return torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])

    @contextlib.contextmanager
    def _eval_mode(self):
        modes = [(m, m.training) for part in self.model_parts for m in part.modules()]
        for part in self.model_parts:
            part.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    @contextlib.contextmanager
    def _routing_counts_dropped(self):
        moes = [moe for part in self.model_parts for moe in moe_modules(part).values()]
        try:
            yield
        finally:
            for moe in moes:
                moe.pop_stats()  # the evaluation's counts: not the next step's, nor the balancing bias's

    def _reshard(self) -> None:
        # A forward without backward leaves the modules that do not reshard after forward (the root,
        # by default the last block) gathered; free them until the next training forward.
        for part in self.model_parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()


def build_validator(cfg: ValidationConfig, data_cfg: DataConfig, tokenizer, seq_len: int,
                    parallel_dims: ParallelDims, step_fn: ForwardBackward, model_parts: list[nn.Module],
                    device: torch.device, train_local_bs: int) -> Validator | None:
    """None unless ``validation.enable``."""
    if not cfg.enable:
        return None
    return Validator(cfg, data_cfg, tokenizer, seq_len, parallel_dims, step_fn, model_parts, device, train_local_bs)

"""Forward and backward over one rank's rows of a global batch, with or without a pipeline.

Everything a training step does before the optimizer: microbatches (gradient accumulation),
the context-parallel split of the sequence, autocast, the cross-entropy (loss-parallel under
TP), the pipeline schedule. The trainer and the memory estimator run the same object.
"""

import contextlib
from typing import Callable

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchtitan.components.loss import cross_entropy
from torchtitan.components.model_builder import BuiltModel
from torchtitan.config.job_config import Training as TrainingConfig
from torchtitan.models.layers import document_ids_from_positions
from torchtitan.models.moe import moe_modules
from torchtitan.parallelisms.context_parallel import ContextParallel
from torchtitan.parallelisms.parallel_dims import ParallelDims


def plain_loss(loss: torch.Tensor) -> torch.Tensor:
    """loss_parallel returns the loss as a replicated DTensor: the same value as a plain tensor."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


class ForwardBackward:
    """Built in two steps: the pipeline schedule needs ``pipeline_loss`` before the model exists,
    so ``attach(built)`` hands the model over once it is built."""

    def __init__(self, training: TrainingConfig, parallel_dims: ParallelDims, device: torch.device,
                 cp: ContextParallel | None, local_bs: int, accum_steps: int, loss_parallel_enabled: bool,
                 before_microbatch: Callable[[bool], None] | None = None, attention_mask: str = "causal",
                 positions: str = "sequence"):
        self.training, self.parallel_dims, self.device, self.cp = training, parallel_dims, device, cp
        self.block_causal, self.document_positions = attention_mask == "block_causal", positions == "document"
        if cp is not None:
            cp.check_document_inputs(self.block_causal, self.document_positions)
        self.local_bs, self.accum_steps = local_bs, accum_steps
        self.loss_parallel = parallel_dims.tp_enabled and loss_parallel_enabled
        self.before_microbatch = before_microbatch  # the memory estimator resets its tracker here
        self.built: BuiltModel | None = None
        self.autocast = self._autocast()

    def attach(self, built: BuiltModel) -> None:
        self.built = built
        # MoE auxiliary losses add their gradient inside the model: scale it like the loss.
        micro = built.pipeline.n_microbatches if built.pipeline is not None else 1
        for part in built.parts:
            for moe in moe_modules(part).values():
                moe.aux_loss_scale = 1.0 / (self.accum_steps * micro)

    def set_local_batch(self, local_bs: int) -> None:
        """Another microbatch size for the same rows per rank (accumulation follows), without PP: the
        schedule's microbatches are fixed when it is built."""
        rows = self.local_bs * self.accum_steps
        if rows % local_bs or self.built.pipeline is not None:
            raise ValueError(f"local batch {local_bs} does not split {rows} rows per rank (or PP is on)")
        self.local_bs, self.accum_steps = local_bs, rows // local_bs
        self.attach(self.built)  # the MoE aux-loss scale follows the accumulation

    def discard_step(self) -> None:
        """Drop what a forward/backward that raised (or is being redone) left behind: the gradients,
        FSDP's per-iteration state (gathered parameters, accumulated unsharded gradients) and the
        MoE routing counts, so that running it again is a fresh step."""
        for part in self.built.parts:
            for p in part.parameters():
                p.grad = None
            if isinstance(part, FSDPModule):  # the root: resets every FSDP module under it
                part.reset_iter_state()
                drop_unsharded_grads(part)
            for moe in moe_modules(part).values():
                moe.pop_stats()

    def _autocast(self):
        """bf16 compute without FSDP: autocast (FSDP's MixedPrecisionPolicy does it when sharding)."""
        default = "bfloat16" if self.device.type == "cuda" else "float32"
        dtype = self.training.mixed_precision_param or default
        if dtype == "float32" or self.parallel_dims.fsdp_enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, dtype))

    def loss_context(self):
        """With TP loss_parallel the logits are vocab-sharded DTensors: the cross-entropy and its
        backward must both run inside ``loss_parallel()``."""
        return loss_parallel() if self.loss_parallel else contextlib.nullcontext()

    def loss_fn(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        # fp32 cross-entropy whatever the compute dtype: bf16 log-softmax over a 128K vocab loses bits.
        return cross_entropy(logits_BTV, labels_BT, self.training.loss_chunk_tokens)

    def pipeline_loss(self, logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
        # The schedule sums microbatch losses (scale_grads=False): divide so that the sum over
        # microbatches and accumulation steps is the mean over this rank's rows, as without PP.
        n_micro = self.built.pipeline.n_microbatches
        return self.loss_fn(logits_BTV, labels_BT) / (n_micro * self.accum_steps)

    def set_gradient_sync(self, enabled: bool) -> None:
        """FSDP: reduce-scatter only on the last microbatch (gradients accumulate unsharded)."""
        if self.before_microbatch is not None:
            self.before_microbatch(enabled)
        if isinstance(self.built.model, FSDPModule):
            self.built.model.set_requires_gradient_sync(enabled)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward + backward of this rank's rows ({"tokens", "positions"}: [G/dp, seq_len + 1] each);
        returns their mean loss."""
        if self.built.pipeline is not None:
            return self.pipeline_forward_backward(batch)
        return self.forward_backward(batch)

    def forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Forward and backward over this rank's rows, local_bs at a time; returns their mean loss."""
        loss_sum = torch.zeros((), device=self.device)
        micros = split_rows(batch, self.local_bs)
        for i, micro in enumerate(micros):
            self.set_gradient_sync(i == len(micros) - 1)
            inputs, labels, kwargs, cp_context = self.model_inputs(micro)
            with cp_context:
                with self.autocast:
                    logits = self.built.model(inputs, **kwargs)
                with self.loss_context():
                    loss = self.loss_fn(logits, labels) / self.accum_steps
                    del logits  # drop our reference before backward: autograd keeps only what it needs
                    loss.backward()
            loss_sum += plain_loss(loss.detach())
        return loss_sum

    def pipeline_forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The schedule runs once per local batch (n_microbatches each; more calls = gradient
        accumulation). Returns the mean loss over this rank's rows on every pp rank."""
        pipe = self.built.pipeline
        loss_sum = torch.zeros((), device=self.device)
        for chunk in split_rows(batch, self.local_bs):
            inputs, labels, kwargs, cp_context = self.model_inputs(chunk)
            args = (inputs,) if pipe.has_first_stage else ()
            target = labels if pipe.has_last_stage else None
            losses = []  # scaled microbatch losses; the schedule fills it on the last stage only
            # loss_context wraps the whole step: loss and backward both run inside the schedule.
            # kwargs (positions, document ids) go to every stage: each stage's blocks need them.
            with cp_context, self.autocast, self.loss_context():
                pipe.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            for loss in losses:
                loss_sum += plain_loss(loss.detach())
        # Only the last stage has the loss: a sum over pp (others add 0) gives it to every rank.
        torch.distributed.all_reduce(loss_sum, group=self.parallel_dims.submesh("pp").get_group())
        return loss_sum

    def model_inputs(self, rows: dict[str, torch.Tensor]):
        """(inputs, labels, model kwargs, context) of rows {"tokens", "positions"} [B, seq_len + 1]:
        with CP, this rank's share of the sequence. The kwargs carry the RoPE positions and document
        ids when ``model.positions`` / ``model.attention_mask`` ask for them (else nothing)."""
        tokens = rows["tokens"].to(self.device, non_blocking=True)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        positions = document_ids = None
        if self.document_positions or self.block_causal:
            doc_positions = rows["positions"].to(self.device, non_blocking=True)[:, :-1]
            positions = doc_positions if self.document_positions else None
            document_ids = document_ids_from_positions(doc_positions) if self.block_causal else None
        if self.cp is not None:
            return self.cp.batch_context(self.built.parts, inputs.contiguous(), labels.contiguous(),
                                         positions, document_ids)
        kwargs = {k: v for k, v in (("positions", positions), ("document_ids", document_ids)) if v is not None}
        return inputs, labels, kwargs, contextlib.nullcontext()

    def evaluate(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only, without gradients, of this rank's validation rows ({"tokens", "positions"}
        [B, seq_len + 1]; under PP one ``schedule.eval``, so B must be the training local batch).
        Returns (summed token cross-entropy, token count), float64 device tensors, zeros on pipeline
        ranks without the last stage. Summed over every rank, tensor-parallel copies of a token count
        in both the same number of times, so their ratio is the mean over distinct tokens."""
        pipe = self.built.pipeline
        inputs, labels, kwargs, cp_context = self.model_inputs(batch)
        with torch.no_grad(), cp_context:
            if pipe is None:
                with self.autocast:
                    logits = self.built.model(inputs, **kwargs)
                with self.loss_context():
                    mean = plain_loss(self.loss_fn(logits, labels))
            else:
                losses = []  # pipeline_loss values: microbatch mean / (n_microbatches x accum_steps)
                args = (inputs,) if pipe.has_first_stage else ()
                target = labels if pipe.has_last_stage else None
                with self.autocast, self.loss_context():
                    pipe.schedule.eval(*args, target=target, losses=losses, return_outputs=False, **kwargs)
                # Equal microbatches: the mean of their means, undoing pipeline_loss's scale.
                mean = torch.stack([plain_loss(x) for x in losses]).sum() * self.accum_steps if losses else None
            n_tokens = labels.numel() if mean is not None else 0  # inside cp_context: this rank's share
        loss_sum = mean.double() * n_tokens if mean is not None else torch.zeros((), dtype=torch.float64,
                                                                                 device=self.device)
        return loss_sum, torch.tensor(float(n_tokens), dtype=torch.float64, device=self.device)


def drop_unsharded_grads(root: nn.Module) -> None:
    """FSDP keeps the gradients of microbatches without gradient sync on its unsharded parameters
    until the last microbatch reduce-scatters them; ``reset_iter_state`` (torch 2.13) leaves them
    there, so a redone step would add them twice. No public API drops them: FSDP's own fields."""
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                if hasattr(fsdp_param, "_unsharded_param"):  # created at the first all-gather
                    fsdp_param._unsharded_param.grad = None
                fsdp_param.unsharded_accumulated_grad = None


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """The batch cut into consecutive pieces of ``rows`` rows (microbatches)."""
    pieces = {key: value.split(rows) for key, value in batch.items()}
    return [dict(zip(pieces, parts)) for parts in zip(*pieces.values())]

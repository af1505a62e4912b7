"""Peak memory of one rank for a model shape and a layout: the accounting the planner, the
automatic micro-batch and the memory estimator's analytic method share.

Bytes at the peak of a steady-state step (the start of the backward of the last microbatch):
- ``params``: this rank's fp32 shards (matrices / tp, experts / (ep x tp), then / (dp_shard x cp)
  under FSDP) and the RoPE table;
- ``grads``: the same size in fp32 (``mixed_precision_reduce`` float32). They are set to None
  between steps, so without accumulation the peak is either the start of the backward (all
  activations, no gradients yet) or its end (all gradients, activations freed), whichever is
  larger; with accumulation (or pipeline microbatches) both are alive at once;
- ``optimizer``: AdamW's two fp32 moments;
- ``other``: what FSDP gathers besides the shards, in the compute dtype -- about two blocks of
  parameters at a time when it reshards after forward (the current block and the prefetched
  one), every block of the stage when it does not (the default under PP), and the root's
  embedding / output for the whole step (FSDP never reshards the root), plus unsharded gradients
  waiting for their reduce-scatter (half as many); DDP's gradient buckets (a copy of the gradients);
- ``activations``: what autograd keeps for backward (see ``block_activation_bytes``) times the
  blocks and microbatches in flight, plus the loss's logits and their gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.planner.layout import Layout, ModelShape, stage_layers

GIB = 1024**3
PARAM_BYTES = 4  # fp32 master weights, gradients and each AdamW moment


@dataclass
class MemoryBreakdown:
    params: int
    grads: int
    optimizer: int
    other: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.other + self.activations

    def summary(self) -> str:
        gib = lambda n: f"{n / GIB:.2f}"  # noqa: E731
        return (f"{gib(self.total)} GiB (params {gib(self.params)}, grads {gib(self.grads)}, optimizer "
                f"{gib(self.optimizer)}, gathered/buckets {gib(self.other)}, activations {gib(self.activations)})")


def block_activation_bytes(shape: ModelShape, layout: Layout, tokens: float, width: int) -> float:
    """Bytes one block keeps for backward over ``tokens`` tokens of this rank, eager autograd.

    Per token: the block input and the residual sum (2D), each RMSNorm's input statistics and
    output (2 x 2D, sequence-sharded under TP), RoPE'd q and k, the (repeated) k and v, the
    attention output and its projection input (~5D, heads split over tp), and the SwiGLU w1, silu,
    w3 and product outputs (4F, split over tp). Op-level selective AC keeps the attention output
    and every other matmul output (~half of it); full AC keeps only the block input.
    """
    D, F, tp = shape.dim, shape.ffn_dim, layout.tp
    per_token = (6 * D + 5 * D + 4 * F) / tp
    if tp > 1:  # sequence parallel: attention's and the MLP's all-gathered inputs (whole sequence)
        per_token += 2 * D
    if shape.num_experts:  # router scores and the token copies sent to / returned from top_k experts
        per_token += (shape.num_experts + 2 * shape.top_k * D) / tp
    return tokens * per_token * width


def _in_flight(layout: Layout, pp_rank: int) -> float:
    """Microbatches whose activations a pipeline rank holds at once (per stage it owns)."""
    style, per_rank, m = layout.schedule()
    if layout.pp == 1:
        return 1
    if layout.pp_schedule.lower() == "gpipe":
        return m
    if style == "loop":  # warmup of the interleaved schedules: (v - 1) x pp + 2 x (pp - 1 - rank) + 1
        return min(m, ((per_rank - 1) * layout.pp + 2 * (layout.pp - 1 - pp_rank) + 1) / per_rank)
    return min(m, layout.pp - pp_rank)  # 1F1B; V schedules hold as many on the V's two stages


def peak_memory(shape: ModelShape, layout: Layout, seq_len: int, width: int, pp_rank: int | None = None,
                loss_chunk_tokens: int = 2048) -> MemoryBreakdown:
    """Peak bytes of one rank; ``pp_rank`` None = the pipeline rank with the largest peak."""
    if pp_rank is None:  # rank 0 holds the most microbatches (and the embedding), the last the loss
        return max((peak_memory(shape, layout, seq_len, width, r, loss_chunk_tokens) for r in {0, layout.pp - 1}),
                   key=lambda m: m.total)
    tp, ep, fsdp = layout.tp, layout.ep, layout.fsdp
    layers, first, last = stage_layers(shape, layout, pp_rank)
    blocks = [shape.layers[i] for i in layers]
    # Per block, before FSDP: what one tp / ep rank holds.
    block_local = [lp.matrix / tp + lp.replicated + lp.expert / (tp * ep) for lp in blocks]
    root = (shape.embedding / tp if first else 0) + ((shape.output / tp + shape.final_norm) if last else 0)
    unsharded = sum(block_local) + root
    # FSDP: dense parameters over dp_shard x cp; experts over the (dp_shard x cp) / ep ranks outside EP.
    sharded = sum(lp.matrix / tp + lp.replicated for lp in blocks) / fsdp + root / fsdp
    sharded += sum(lp.expert / (tp * ep) for lp in blocks) / (fsdp / ep)
    rope = seq_len * shape.head_dim * 4  # complex64 table [seq_len, head_dim / 2]
    params = sharded * PARAM_BYTES + rope
    grads = sharded * PARAM_BYTES
    optimizer = 2 * sharded * PARAM_BYTES
    other = 0.0
    if fsdp > 1:
        gathered_blocks = min(2, len(blocks)) * max(block_local, default=0) if layout.reshards() else sum(block_local)
        other = 1.5 * (gathered_blocks + root) * width  # parameters, and unsharded gradients in flight
    elif layout.dp_replicate > 1:
        other = unsharded * PARAM_BYTES  # DDP buckets
    _, _, m = layout.schedule()
    micro_rows = layout.local_bs / m if layout.pp > 1 else layout.local_bs
    tokens = micro_rows * seq_len / layout.cp
    in_flight = _in_flight(layout, pp_rank)
    per_block = block_activation_bytes(shape, layout, tokens, width)
    checkpoint_input = tokens * shape.dim / tp * width
    n = len(blocks)
    # Checkpointed blocks: during a block's backward its recomputed activations and their gradients
    # are alive (~2 blocks' worth), after the loss's tensors are gone -- whichever is larger counts.
    recompute = 0.0
    if layout.ac == "full":
        saved, recompute = n * in_flight * checkpoint_input, 2 * per_block
    elif layout.ac == "selective" and layout.ac_option.isdigit():
        n_ckpt = -(-n // int(layout.ac_option))
        saved = in_flight * ((n - n_ckpt) * per_block + n_ckpt * checkpoint_input)
        recompute = 2 * per_block
    elif layout.ac == "selective":  # op policy
        saved = n * in_flight * per_block * 0.5 + per_block * 0.5
    else:
        saved = n * in_flight * per_block
    if layout.cp > 1:  # all-gathered K and V of the whole sequence, kept per block for backward
        kv = 2 * micro_rows * seq_len * shape.n_kv_heads * shape.head_dim / tp * width
        saved += (n * in_flight if layout.ac == "none" else 1) * kv
    loss = 0.0
    if last:
        vocab = shape.vocab / (tp if layout.loss_parallel and tp > 1 else 1)
        # fp32 logits: the log-softmax kept for backward and its gradient. bf16 logits: the logits
        # and their gradient, plus the fp32 log-softmax of one chunk of tokens at a time
        # (training.loss_chunk_tokens) and its gradient.
        if width == 4:
            loss = (3 if vocab < shape.vocab else 2) * tokens * vocab * 4  # loss parallel: one more temporary
        else:
            chunk = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
            loss = 2 * tokens * vocab * width + 2 * chunk * vocab * 4
    activations = saved + max(loss, recompute)
    if layout.accum * (m if layout.pp > 1 else 1) == 1:  # no accumulation: gradients or activations peak
        grads, activations = (0, activations) if activations >= grads else (grads, 0)
    return MemoryBreakdown(params=int(params), grads=int(grads), optimizer=int(optimizer), other=int(other),
                           activations=int(activations))


def compute_width(mixed_precision_param: str, device_type: str) -> int:
    """Bytes per activation / gathered parameter element: bf16 unless fp32 (the CPU default)."""
    dtype = mixed_precision_param or ("bfloat16" if device_type == "cuda" else "float32")
    return 2 if dtype == "bfloat16" else 4


def memory_for_job(cfg, parallel_dims, model_args, local_bs: int, device_type: str) -> MemoryBreakdown:
    """The peak of the run ``cfg`` describes with this local batch (the accumulation does not
    change it), on the pipeline rank that needs the most."""
    shape = ModelShape.from_args(cfg.model.name, cfg.model.flavor, model_args)
    rows = cfg.training.global_batch_size // parallel_dims.dp
    layout = Layout.from_config(cfg, parallel_dims.world_size, local_bs, max(1, rows // local_bs), parallel_dims)
    width = compute_width(cfg.training.mixed_precision_param, device_type)
    return peak_memory(shape, layout, cfg.training.seq_len, width, loss_chunk_tokens=cfg.training.loss_chunk_tokens)

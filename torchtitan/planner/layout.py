"""What the planner reasons about: the model's shape (parameter counts by how they shard) and one layout.

``ModelShape`` comes from the registered family's own blocks built on the meta device, so every
family (and every flavor override) is counted exactly, without the planner knowing its code:
each parameter is filed by how the parallel plans shard it -- a matrix (split over tp), a norm
or router weight (replicated over tp), an expert weight (split over ep and, under TP, over tp).

``Layout`` is one point of the search: the mesh degrees, the pipeline schedule, activation
checkpointing, float8 and the batch split. ``Layout.from_config`` reads a trainer config, so the
memory estimator, the automatic micro-batch and the planner share one accounting.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import torch

from torchtitan.models.registry import get_spec
from torchtitan.parallelisms.pipeline import resolve_schedule, stage_boundaries


@dataclass(frozen=True)
class LayerParams:
    """Parameter counts of one block, by sharding class."""

    matrix: int  # Linear weights: split over tp
    replicated: int  # norms, the MoE router: whole on every tp rank
    expert: int  # routed experts' weights: split over ep x tp

    @property
    def total(self) -> int:
        return self.matrix + self.replicated + self.expert


@dataclass(frozen=True)
class ModelShape:
    family: str
    flavor: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # per-token MLP width: dense hidden, or (top_k + shared) x expert hidden under MoE
    vocab: int
    layers: tuple[LayerParams, ...]
    embedding: int
    output: int  # 0 when tied to the embedding
    final_norm: int
    num_experts: int = 0
    top_k: int = 0
    moe_layers: int = 0

    @property
    def params(self) -> int:
        return sum(lp.total for lp in self.layers) + self.embedding + self.output + self.final_norm

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies with (MoE: top_k of num_experts experts)."""
        expert = sum(lp.expert for lp in self.layers)
        active = expert * self.top_k // self.num_experts if self.num_experts else expert
        return self.params - expert + active

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) as the families count them for MFU:
        6 x active non-embedding parameters + 12 x layers x heads x head_dim x seq_len
        (causal masking not subtracted, as in PaLM / torchtitan). A tied embedding is the output."""
        matmul = self.active_params - (self.embedding if self.output else 0)
        return 6 * matmul + 12 * self.n_layers * self.n_heads * self.head_dim * seq_len

    @classmethod
    def from_args(cls, family: str, flavor: str, args) -> "ModelShape":
        spec = get_spec(family)
        with torch.device("meta"):
            blocks = [spec.model_cls.block_cls(i, args) for i in range(args.n_layers)]
        layers = tuple(_classify(block) for block in blocks)
        moe = getattr(args, "moe", None)
        dim = args.dim
        head_dim = getattr(args, "head_dim", dim // args.n_heads)
        dense_ffn = getattr(args, "ffn_hidden_dim", None) or getattr(args, "hidden_dim")
        moe_layers = sum(1 for lp in layers if lp.expert)
        ffn = dense_ffn
        if moe is not None and moe_layers:
            ffn = (moe.top_k + moe.num_shared_experts) * moe.hidden_dim
        tied = bool(getattr(args, "tie_word_embeddings", False))
        return cls(
            family=family, flavor=flavor, dim=dim, n_layers=args.n_layers, n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads, head_dim=head_dim, ffn_dim=ffn, vocab=args.vocab_size, layers=layers,
            embedding=args.vocab_size * dim, output=0 if tied else args.vocab_size * dim, final_norm=dim,
            num_experts=moe.num_experts if moe is not None and moe_layers else 0,
            top_k=moe.top_k if moe is not None and moe_layers else 0, moe_layers=moe_layers,
        )

    @classmethod
    def from_flavor(cls, family: str, flavor: str, seq_len: int, vocab_size: int = 0, **overrides) -> "ModelShape":
        """A flavor's shape; vocab 0 = the flavor's own (Llama 3: 128256, Qwen3: 151936)."""
        spec = get_spec(family)
        vocab = vocab_size or spec.flavors[flavor].vocab_size if flavor in spec.flavors else vocab_size
        args = spec.build_args(flavor, vocab_size=vocab, max_seq_len=seq_len, **overrides)
        return cls.from_args(family, flavor, args)


def _classify(block: torch.nn.Module) -> LayerParams:
    matrix = replicated = expert = 0
    for name, p in block.named_parameters():
        if ".experts." in f".{name}":
            expert += p.numel()
        elif p.ndim == 1 or "router" in name:
            replicated += p.numel()
        else:
            matrix += p.numel()
    return LayerParams(matrix, replicated, expert)


_resolve = functools.lru_cache(maxsize=64)(resolve_schedule)


@dataclass(frozen=True)
class Layout:
    """One way to run a model on ``world`` devices. Degrees multiply to the world size."""

    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int = 0  # 0 = the schedule's default (pp, or the stage count)
    ac: str = "none"  # none | full | selective
    ac_option: str = "op"  # selective: op or N
    local_bs: int = 1  # sequences per forward on one rank (per schedule call under PP)
    accum: int = 1
    float8: bool = False
    compile: bool = False
    reshard_after_forward: str = "default"
    loss_parallel: bool = True
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp * self.cp

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks FSDP shards the dense parameters over (dp_shard x cp), 1 = no sharding."""
        return self.dp_shard * self.cp

    @property
    def global_batch(self) -> int:
        return self.local_bs * self.accum * self.dp

    def schedule(self) -> tuple[str, int, int]:
        """(style, stages per rank, microbatches): style single | loop | v (no PP: single, 1, 1)."""
        if self.pp == 1:
            return "single", 1, 1
        plan = _resolve(self.pp_schedule)
        per_rank = 1 if plan.style == "single" else 2
        n = self.pp_microbatches or (self.pp if plan.style == "single" else self.pp * per_rank)
        return plan.style, per_rank, n

    def reshards(self) -> bool:
        if self.reshard_after_forward == "default":
            return self.pp == 1
        return self.reshard_after_forward == "always"

    def ac_label(self) -> str:
        """The activation checkpointing as the table and the explanation name it: none, full, op
        (selective per op) or selective N (every N-th block)."""
        if self.ac == "selective":
            return "op" if self.ac_option == "op" else f"selective {self.ac_option}"
        return self.ac

    def describe(self) -> str:
        parts = [f"{k}{v}" for k, v in (("dp", self.dp_replicate), ("fsdp", self.dp_shard), ("tp", self.tp),
                                        ("pp", self.pp), ("cp", self.cp), ("ep", self.ep)) if v > 1]
        if self.dp_replicate > 1 and self.dp_shard > 1:
            parts[0] = f"hsdp{self.dp_replicate}x{self.dp_shard}"
            parts = [p for p in parts if not p.startswith("fsdp")]
        if self.pp > 1:
            _, _, n = self.schedule()
            parts.append(f"{self.pp_schedule}/{n}mb")
        ac = "" if self.ac == "none" else f"AC {self.ac_label()}"
        extra = [e for e in (ac, "fp8" if self.float8 else "", "compile" if self.compile else "") if e]
        return " ".join(parts or ["1 device"]) + (" | " + " ".join(extra) if extra else "")

    @classmethod
    def from_config(cls, cfg, world_size: int, local_bs: int, accum: int, parallel_dims=None) -> "Layout":
        """The layout a trainer config runs (degrees resolved against the world size)."""
        p = cfg.parallelism
        if parallel_dims is None:
            from torchtitan.parallelisms.parallel_dims import ParallelDims

            parallel_dims = ParallelDims(p.dp_replicate, p.dp_shard, p.cp, p.tp, p.pp, world_size, ep=p.ep)
        d = parallel_dims
        ac = cfg.activation_checkpoint
        return cls(
            dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, tp=d.tp, pp=d.pp, cp=d.cp, ep=d.ep,
            pp_schedule=p.pp_schedule, pp_microbatches=p.pp_microbatches, ac=ac.mode,
            ac_option=ac.selective_ac_option, local_bs=local_bs, accum=accum,
            float8=cfg.float8.enable_float8_linear, compile=cfg.compile.enable,
            reshard_after_forward=p.fsdp_reshard_after_forward, loss_parallel=p.loss_parallel,
        )

    def with_batch(self, local_bs: int, accum: int) -> "Layout":
        return replace(self, local_bs=local_bs, accum=accum)


def stage_layers(shape: ModelShape, layout: Layout, pp_rank: int = 0) -> tuple[list[int], bool, bool]:
    """(layer indices, holds the embedding, holds the output) of one pipeline rank."""
    if layout.pp == 1:
        return list(range(shape.n_layers)), True, True
    return _stage_layers(shape.n_layers, layout.pp, layout.pp_schedule, pp_rank)


@functools.lru_cache(maxsize=4096)
def _stage_layers(n_layers: int, pp: int, schedule: str, pp_rank: int) -> tuple[list[int], bool, bool]:
    style, per_rank, _ = Layout(pp=pp, pp_schedule=schedule).schedule()
    n_stages = pp * per_rank
    names = [str(i) for i in range(n_layers)]
    bounds = stage_boundaries(names, n_stages, []) + [n_layers]
    if style == "v":
        stages = (pp_rank, n_stages - 1 - pp_rank)
    else:
        stages = tuple(range(pp_rank, n_stages, pp))
    layers = [i for s in stages for i in range(bounds[s], bounds[s + 1])]
    return layers, 0 in stages, n_stages - 1 in stages

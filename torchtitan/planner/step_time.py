"""Step time of a layout: compute at a calibrated fraction of peak plus what each mesh dimension's
communication leaves exposed.

Per optimizer step, on the busiest rank:
- ``compute``: the matmul FLOPs this rank runs (its blocks' share of 6 x active parameters per token
  under tp, causal attention at half the dense count, the recomputed forward of checkpointed blocks),
  at ``peak x matmul_efficiency x s / (s + half_size)`` (s = the smallest GEMM dimension: small
  per-rank shapes run below peak), plus the non-matmul ops (``elementwise_overhead``, less when
  compiled), and the host's dispatch of each op (hidden behind the kernels on a GPU unless they are
  shorter, added on a CPU); float8 linears at the float8 peak plus their casts;
- ``bubble``: the pipeline's idle fraction, (pp - 1) / m for GPipe / 1F1B, / v for interleaved
  schedules with v stages per rank, a third of it for the zero-bubble ones;
- ``fsdp``: all-gathers (per microbatch and pass when resharding after forward, once per local
  batch when not) and the reduce-scatter of gradients, hidden behind the previous block's compute
  except the first gather, the last scatter and whatever a block's compute cannot cover;
- ``tp``: 4 collectives of a microbatch's activations per block and pass (sequence parallel:
  all-gather before attention / MLP, reduce-scatter after), on NVLink when tp fits a node, exposed;
- ``cp``: the K/V all-gather per block (reduce-scatter of their gradients in backward), exposed;
- ``ep``: dispatch and combine all-to-alls per MoE layer and pass (+ the split-size exchange), exposed;
- ``dp``: the replica all-reduce (HSDP / DDP) across dp_replicate, overlapped with the backward;
- ``optimizer``: AdamW reads and writes ~28 bytes per local parameter (memory bound), gradient clipping.
A ring collective of B bytes over n ranks moves (n - 1) / n x B per rank (all-reduce twice that)
at the bandwidth of the slowest link of its group (inside a node, or the NIC between nodes).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

from torchtitan.planner.hardware import Hardware
from torchtitan.planner.layout import Layout, ModelShape, stage_layers

PARTS = ("compute", "bubble", "fsdp", "tp", "cp", "ep", "dp", "optimizer")
OPS_PER_BLOCK = 40  # kernels a block launches per forward (eager); backward twice that


@dataclass
class StepTime:
    compute: float = 0.0
    bubble: float = 0.0
    fsdp: float = 0.0
    tp: float = 0.0
    cp: float = 0.0
    ep: float = 0.0
    dp: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self))

    @property
    def comm(self) -> float:
        return self.fsdp + self.tp + self.cp + self.ep + self.dp


@dataclass(frozen=True)
class Topology:
    gpus_per_node: int

    def spans_nodes(self, stride: int, size: int) -> bool:
        return size > 1 and stride * size > self.gpus_per_node


def _group_strides(layout: Layout) -> dict[str, tuple[int, int]]:
    """(stride, size) of each mesh dimension's groups; the mesh is [pp, dp_replicate, dp_shard, cp, tp]."""
    t, c, s = layout.tp, layout.cp, layout.dp_shard
    return {"tp": (1, t), "cp": (t, c), "fsdp": (t, s * c), "ep": (t, layout.ep),
            "dp": (t * c * s, layout.dp_replicate), "pp": (t * c * s * layout.dp_replicate, layout.pp)}


def group_spans_nodes(layout: Layout, dim: str, gpus_per_node: int) -> bool:
    """Whether the groups of mesh dimension ``dim`` ("dp", "fsdp", "tp", ...) reach over nodes."""
    return Topology(gpus_per_node).spans_nodes(*_group_strides(layout)[dim])


class CommModel:
    def __init__(self, hw: Hardware, topo: Topology, layout: Layout):
        self.hw, self.topo, self.strides = hw, topo, _group_strides(layout)

    def _link(self, dim: str) -> tuple[float, float]:
        stride, size = self.strides[dim]
        if self.topo.spans_nodes(stride, size):
            return self.hw.inter_gbps * 1e9, self.hw.inter_latency_s
        return self.hw.intra_gbps * 1e9, self.hw.latency_s

    def gather(self, dim: str, nbytes: float) -> float:
        """All-gather (or reduce-scatter) whose full result is ``nbytes``."""
        n = self.strides[dim][1]
        if n == 1 or nbytes == 0:
            return 0.0
        bw, lat = self._link(dim)
        return lat + (n - 1) / n * nbytes / bw

    def all_reduce(self, dim: str, nbytes: float) -> float:
        n = self.strides[dim][1]
        if n == 1 or nbytes == 0:
            return 0.0
        bw, lat = self._link(dim)
        return 2 * lat + 2 * (n - 1) / n * nbytes / bw

    def all_to_all(self, dim: str, nbytes: float) -> float:
        n = self.strides[dim][1]
        if n == 1:
            return 0.0
        bw, lat = self._link(dim)
        return lat + (n - 1) / n * nbytes / bw


def _efficiency(hw: Hardware, smallest_dim: float) -> float:
    return hw.matmul_efficiency * smallest_dim / (smallest_dim + hw.half_size)


def step_time(shape: ModelShape, layout: Layout, seq_len: int, hw: Hardware, topo: Topology,
              pp_rank: int = 0) -> StepTime:
    t = StepTime()
    comm = CommModel(hw, topo, layout)
    tp, cp, ep = layout.tp, layout.cp, layout.ep
    w = hw.compute_bytes
    layers, first, last = stage_layers(shape, layout, pp_rank)
    blocks = [shape.layers[i] for i in layers]
    style, per_rank, m = layout.schedule()
    micro_rows = layout.local_bs / m if layout.pp > 1 else layout.local_bs
    n_micro = layout.accum * (m if layout.pp > 1 else 1)  # microbatch passes per step on this rank
    micro_tokens = micro_rows * seq_len / cp
    step_tokens = micro_tokens * n_micro

    # ---- compute ------------------------------------------------------------------------
    def linear_flops(lp) -> float:  # per token, forward + backward
        active = lp.expert * shape.top_k / shape.num_experts if shape.num_experts else lp.expert
        return 6 * (lp.matrix + active) / tp

    counts = Counter(blocks)
    lin = sum(k * linear_flops(lp) for lp, k in counts.items())
    attn = len(blocks) * 12 * shape.n_heads * shape.head_dim * seq_len / tp * 0.5  # causal: half the tiles
    recompute = {"full": 1 / 3, "none": 0.0}.get(layout.ac)
    if recompute is None:  # selective: op = every other matmul again; N = every N-th block's forward
        recompute = 1 / 6 if not layout.ac_option.isdigit() else 1 / (3 * int(layout.ac_option))
    lin_all = lin * (1 + recompute)
    attn_all = attn * (1 + (recompute if layout.ac == "full" or layout.ac_option.isdigit() else 0))
    head = 6 * shape.vocab * shape.dim / tp if last else 0.0
    smallest = min(micro_tokens, shape.dim / tp, shape.ffn_dim / tp)
    rate = hw.peak_tflops * 1e12 * _efficiency(hw, smallest)
    attn_rate = hw.peak_tflops * 1e12 * hw.attention_efficiency
    if layout.float8 and hw.fp8_tflops:  # float8 linears (not the output head) plus their scaling casts
        fp8_rate = hw.fp8_tflops * 1e12 * _efficiency(hw, smallest)
        matmul_s = step_tokens * (lin_all / fp8_rate + 0.25 * lin_all / rate + head / rate)
    else:
        matmul_s = step_tokens * (lin_all + head) / rate
    matmul_s += step_tokens * attn_all / attn_rate
    overhead = hw.compiled_overhead if layout.compile else hw.elementwise_overhead
    launch_s = hw.launch_s + (hw.dtensor_launch_s if tp > 1 else 0.0)  # DTensor's sharding propagation per op
    launches = n_micro * len(blocks) * OPS_PER_BLOCK * 3 * (1 + recompute) * launch_s / (4 if layout.compile else 1)
    kernels = matmul_s * (1 + overhead)
    t.compute = max(kernels, launches) if hw.launch_overlaps else kernels + launches
    fwd_share = 1 / 3  # of the compute: the forward; the backward is the other two thirds

    # ---- pipeline bubble and send/recv ----------------------------------------------------
    if layout.pp > 1:
        bubble = (layout.pp - 1) / m
        if style == "loop":
            bubble /= per_rank
        if "zero" in layout.pp_schedule.lower() or style == "v":
            bubble /= 3
        # Ranks that share compute units (CPU processes on fewer cores) give their share to the busy
        # ones while idle: the bubble costs only what the shared capacity cannot absorb.
        t.bubble = max(0.0, t.compute * (1 + bubble) / hw.shared_compute - t.compute)
        hop = micro_tokens * shape.dim / tp * w
        t.bubble += 2 * (layout.pp - 1) * comm.gather("pp", hop * 2)  # fill and drain

    # ---- FSDP ---------------------------------------------------------------------------------
    if layout.fsdp > 1:
        # Blocks of one model share a few shapes (dense / MoE): cost each shape once.
        kinds = Counter((lp.matrix / tp + lp.replicated + lp.expert / (tp * ep)) * w for lp in blocks)
        root = ((shape.embedding / tp if first else 0) + (shape.output / tp if last else 0)) * w
        per_block_compute = t.compute / max(1, len(blocks)) / n_micro
        gathers = 2 * n_micro if layout.reshards() else layout.accum
        hide = per_block_compute * (fwd_share if layout.reshards() else 1) * hw.comm_overlap
        exposed = sum(k * max(0.0, comm.gather("fsdp", b) - hide) for b, k in kinds.items())
        first_gather = comm.gather("fsdp", max(kinds, default=0))
        t.fsdp = gathers * (exposed + first_gather) + comm.gather("fsdp", root)
        rs = {b: comm.gather("fsdp", b / w * 4) for b in kinds}  # fp32 gradient reduce
        hide_rs = per_block_compute * (1 - fwd_share) * hw.comm_overlap
        t.fsdp += sum(k * max(0.0, rs[b] - hide_rs) for b, k in kinds.items())
        t.fsdp += max(rs.values(), default=0.0)
        t.fsdp += comm.gather("fsdp", root / w * 4)

    # ---- TP, CP, EP ------------------------------------------------------------------------
    passes = 2 + (1 if layout.ac == "full" else 0)  # forward, backward, recomputed forward
    if tp > 1:
        act = micro_rows * seq_len / cp * shape.dim * w  # a full-sequence activation of the microbatch
        t.tp = n_micro * len(blocks) * passes * 4 * comm.gather("tp", act)
        if last:
            t.tp += n_micro * 3 * comm.all_reduce("tp", micro_tokens * 4)  # loss-parallel max / sum / target
    if cp > 1:
        kv = 2 * micro_rows * seq_len * shape.n_kv_heads * shape.head_dim / tp * w
        t.cp = n_micro * len(blocks) * passes * 2 * comm.gather("cp", kv / 2)  # K and V: one collective each
    if ep > 1 and shape.num_experts:
        moe_blocks = sum(1 for lp in blocks if lp.expert)
        routed = micro_tokens * shape.top_k * shape.dim * w
        t.ep = n_micro * moe_blocks * passes * 2 * (comm.all_to_all("ep", routed) + comm.all_to_all("ep", 8 * ep))

    # ---- replicas and the optimizer ---------------------------------------------------------
    local_params = sum(k * (lp.matrix / tp + lp.replicated + lp.expert / (tp * ep)) for lp, k in counts.items())
    local_params += (shape.embedding / tp if first else 0) + ((shape.output / tp + shape.final_norm) if last else 0)
    shard = local_params / layout.fsdp
    if layout.dp_replicate > 1:
        ar = comm.all_reduce("dp", shard * 4)
        hide_dp = 0.8 * t.compute * (1 - fwd_share) * hw.comm_overlap
        t.dp = max(0.0, ar - hide_dp) + min(ar, comm.all_reduce("dp", 25e6))
    t.optimizer = 28 * shard / (hw.hbm_gbps * 1e9) * 2 + 2 * hw.latency_s * layout.pp
    return t


def busiest(shape: ModelShape, layout: Layout, seq_len: int, hw: Hardware, topo: Topology) -> StepTime:
    """The pipeline rank whose step is longest (every rank waits for it)."""
    # The first rank (embedding, the most layers of a ceil split) or the last (output head, loss).
    return max((step_time(shape, layout, seq_len, hw, topo, r) for r in {0, layout.pp - 1}), key=lambda s: s.total)

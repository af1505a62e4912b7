"""The hardware the planner models: one small table of published constants and the calibration.

Every number the step-time model uses about a machine lives in ``Hardware``; nothing else in
the planner knows a GPU by name. The GPU rows are vendor datasheet figures (dense, no sparsity)
and the efficiency factors are what large public runs reach (see BENCHMARKS.md, "Planner"):

- ``peak_tflops`` / ``fp8_tflops``: dense bf16 / float8 tensor-core peak per device;
- ``matmul_efficiency``: the fraction of that peak a training GEMM sustains, forward and backward
  (H100 bf16 GEMMs of 4096-8192-wide shapes: ~70% of the datasheet peak); ``half_size`` the GEMM
  dimension at which it falls to half of that (small per-rank shapes under TP or tiny
  microbatches); ``attention_efficiency`` the same for the attention kernels (FlashAttention /
  cuDNN forward + backward reach ~40% of peak on H100, the backward being the slow half);
- ``elementwise_overhead``: time of the non-matmul ops (norms, RoPE, softmax, SwiGLU, casts) as
  a fraction of the matmul time, eager; ``torch.compile`` fuses them (``compiled_overhead``);
- ``intra_gbps`` / ``inter_gbps``: bandwidth per device and direction inside a node (NVLink)
  and between nodes (one NIC per GPU), as collectives reach it (ring bus bandwidth);
- ``latency_s``: the fixed cost of one collective, ``hbm_gbps``: memory bandwidth (the optimizer
  step is memory bound), ``memory_gib``: what the device gives the allocator;
- ``comm_overlap``: how much of a block's compute can hide FSDP / DDP collectives: 1 on GPUs (NCCL
  runs on its own stream and SMs), ~0 on a CPU (gloo's threads compete with compute for the cores);
- ``launch_s``: the host's cost of dispatching one eager op (``dtensor_launch_s`` more for an op on
  DTensors, under TP); on a GPU it overlaps the kernels (``launch_overlaps``: it only shows when the
  kernels are shorter), on a CPU it adds up;
- ``peak_known``: False for the nominal ``cpu`` row, whose peak is a placeholder: the plan prints
  no MFU against it (a calibration measures the real one);
- ``shared_compute``: processes per compute unit. 1 for GPUs; a CPU host running more ranks than
  cores measures ``peak_tflops`` with every rank busy, and a rank idle in a pipeline bubble hands
  its share of the cores to the others, so bubbles cost less there.

``calibrate.py`` measures the same fields on this machine (matmul throughput, gloo collective
bandwidth and latency with N processes at once, memory bandwidth) and writes them as JSON, so the
model can be checked where it can run; ``--hardware file.json`` loads such a file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Hardware:
    name: str
    memory_gib: float
    peak_tflops: float
    fp8_tflops: float
    hbm_gbps: float
    intra_gbps: float
    inter_gbps: float
    latency_s: float = 20e-6
    inter_latency_s: float = 40e-6
    matmul_efficiency: float = 0.70
    attention_efficiency: float = 0.40
    half_size: float = 96.0
    elementwise_overhead: float = 0.40
    compiled_overhead: float = 0.25
    comm_overlap: float = 1.0  # fraction of compute that FSDP / DDP collectives can hide behind
    launch_s: float = 6e-6  # host cost of dispatching one op (eager)
    launch_overlaps: bool = True  # GPU: kernels run while the host dispatches; CPU: one after the other
    dtensor_launch_s: float = 40e-6  # extra host cost of an op on DTensors (TP): sharding propagation
    shared_compute: float = 1.0  # processes per compute unit (CPU ranks on fewer cores: > 1)
    compute_bytes: int = 2  # activations and gathered parameters (bf16); 4 on CPU (fp32)
    peak_known: bool = True  # False: peak_tflops is a placeholder the step times assume, no real peak
    notes: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def describe_peak(self) -> str:
        """The peak as the plan prints it: TFLOPs or, for a CPU, GFLOP/s, in the compute dtype."""
        dtype = "bf16" if self.compute_bytes == 2 else "fp32"
        if not self.peak_known:
            return (f"peak n/a: uncalibrated, step times assume {self.peak_tflops * 1e3:.0f} GFLOP/s {dtype}; "
                    "plan.py --calibrate measures this machine")
        if self.peak_tflops >= 1:
            return f"{self.peak_tflops:.0f} TFLOPs {dtype}"
        return f"{self.peak_tflops * 1e3:.1f} GFLOP/s {dtype}"


# Datasheet peaks (dense); bandwidths per GPU and direction: NVLink 4 = 450 GB/s, NVLink 5 = 900 GB/s,
# NVLink 3 = 300 GB/s; 400 Gb/s NDR InfiniBand per GPU = 50 GB/s, 200 Gb/s HDR = 25 GB/s. Collectives
# reach ~80% of them (the ring's bus bandwidth), which is what the table holds.
GPUS: dict[str, Hardware] = {
    "h100": Hardware("h100", memory_gib=79.1, peak_tflops=989.0, fp8_tflops=1979.0, hbm_gbps=3350.0,
                     intra_gbps=360.0, inter_gbps=40.0, notes="H100 SXM 80 GB, NVLink 4, 400 Gb/s IB per GPU"),
    "h200": Hardware("h200", memory_gib=139.8, peak_tflops=989.0, fp8_tflops=1979.0, hbm_gbps=4800.0,
                     intra_gbps=360.0, inter_gbps=40.0, notes="H200 SXM 141 GB, NVLink 4, 400 Gb/s IB per GPU"),
    "b200": Hardware("b200", memory_gib=178.0, peak_tflops=2250.0, fp8_tflops=4500.0, hbm_gbps=8000.0,
                     intra_gbps=720.0, inter_gbps=40.0, half_size=128.0,
                     notes="B200 (HGX, 180 GB), NVLink 5, 400 Gb/s IB per GPU"),
    "a100-80g": Hardware("a100-80g", memory_gib=79.1, peak_tflops=312.0, fp8_tflops=0.0, hbm_gbps=2039.0,
                         intra_gbps=240.0, inter_gbps=20.0, matmul_efficiency=0.8, half_size=64.0,
                         notes="A100 SXM 80 GB, NVLink 3, 200 Gb/s IB per GPU; no float8"),
    # A nominal CPU host (fp32, gloo over loopback): scaled-down plans and tests. Measure the real
    # one with --calibrate.
    "cpu": Hardware("cpu", memory_gib=4.0, peak_tflops=0.05, fp8_tflops=0.0, hbm_gbps=10.0, intra_gbps=1.0,
                    inter_gbps=1.0, latency_s=100e-6, inter_latency_s=100e-6, matmul_efficiency=1.0,
                    attention_efficiency=0.5, half_size=32.0, compute_bytes=4, launch_s=50e-6,
                    launch_overlaps=False, comm_overlap=0.0, dtensor_launch_s=300e-6, peak_known=False,
                    notes="nominal CPU process (uncalibrated): run plan.py --calibrate for this machine's"),
}  # fmt: skip


def load_hardware(path: str) -> Hardware:
    """A calibration file (``plan.py --calibrate``) or a hand-written custom GPU, as JSON."""
    try:
        with open(path) as f:
            fields = json.load(f)
    except OSError as e:
        raise ValueError(f"--hardware {path}: cannot read it ({e.strerror}); write one with --calibrate") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--hardware {path} is not JSON ({e}); write one with --calibrate") from e
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"--hardware {path}: unknown fields {unknown}; the fields are {sorted(known)}")
    try:
        return Hardware(**fields)
    except TypeError as e:
        raise ValueError(f"--hardware {path}: {e}") from e


def hardware_for(gpu: str, hardware_file: str = "", **overrides) -> Hardware:
    """The named GPU (or a JSON file), with any field overridden (e.g. memory_gib for a custom part)."""
    if hardware_file:
        hw = load_hardware(hardware_file)
    elif gpu in GPUS:
        hw = GPUS[gpu]
    else:
        raise ValueError(f"--gpu {gpu!r} is not in the table: use one of {', '.join(GPUS)}, or --hardware FILE "
                         "(a calibration written by --calibrate, or a custom GPU as JSON)")
    overrides = {k: v for k, v in overrides.items() if v}
    if "peak_tflops" in overrides:  # the user's number is a real peak
        overrides["peak_known"] = True
    return dataclasses.replace(hw, **overrides) if overrides else hw

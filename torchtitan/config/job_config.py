"""The typed configuration tree.

Every section is a dataclass; a component is built from its own section only
(``build_optimizer(cfg.optimizer, ...)``), never from the whole tree. TOML files
and ``--section.key value`` overrides are thin serializations of this tree
(see ``manager.py``): precedence is CLI > TOML > the defaults written here.

The help text of each option is the ``help`` entry of its field metadata;
``python train.py --help`` prints it with the default. A key with a closed set of values
is annotated ``Literal[...]``: that annotation is the one declaration the parser checks,
``--help`` and the README reference print.
"""

import typing
from dataclasses import dataclass, field
from typing import Literal


def choices(section_cls: type, key: str) -> tuple:
    """The allowed values of a ``Literal[...]`` key (what components check when built directly)."""
    return typing.get_args(typing.get_type_hints(section_cls)[key])


def opt(default, help: str):
    """A field with a help text (lists get a fresh copy per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class Job:
    config_file: str = opt(
        "", "TOML file to read (also --config); CLI overrides it, it overrides the defaults. train.py without "
        "one reads train_configs/debug_model.toml"
    )
    dump_folder: str = opt("./outputs", "Folder for metrics, checkpoints, traces and the resolved config")
    description: str = opt("", "Free-text description of the run")
    print_config: bool = opt(False, "Print the resolved config at start-up")
    lock: bool = opt(
        True, "Hold <dump_folder>/run.lock while running: a second live run into the folder is refused, a dead "
        "run's lock is taken over (off: runs that share a folder on purpose)"
    )
    lock_timeout_seconds: float = opt(
        300.0, "A lock held from another host is taken over once its heartbeat (refreshed every tenth of "
        "this) is older than this"
    )
    overwrite: bool = opt(
        False, "A fresh start into a folder that holds another run (its metrics, or checkpoints of another "
        "model) moves that run's files into <dump_folder>/replaced-<run_id>/ instead of refusing; nothing is "
        "deleted, and a resumable checkpoint of this model is still resumed"
    )


@dataclass
class Model:
    name: str = opt("llama3", "Model family: llama3 or qwen3 (any family registered in torchtitan/models)")
    flavor: str = opt(
        "debugmodel", "Model size, one of the family's flavors (llama3: debugmodel, 1B ... 405B; qwen3: "
        "debugmodel, debugmodel_moe, 0.6B ... 32B, 30B-A3B, 235B-A22B)"
    )
    n_layers: int = opt(0, "Override the flavor's layer count (0 = keep the flavor's)")
    dim: int = opt(0, "Override the flavor's model width (0 = keep the flavor's)")
    n_kv_heads: int = opt(0, "Override the flavor's key/value head count (0 = keep; = n_heads for MHA)")
    vocab_size: int = opt(
        0, "Embedding/output rows (0 = the tokenizer's); larger pads the vocab, e.g. 128256 to benchmark "
        "a Llama 3 shape with a small tokenizer"
    )
    attention_backend: Literal["auto", "flash", "cudnn", "efficient", "math", "flex"] = opt(
        "auto", "Attention kernel: auto (SDPA, torch picks per call; FlexAttention for block_causal on CUDA), "
        "an SDPA kernel pinned (no fall-back), or flex (FlexAttention; training needs CUDA)"
    )
    attention_mask: Literal["causal", "block_causal"] = opt(
        "causal", "causal: a token sees every earlier token of its packed sequence; block_causal: only the "
        "earlier tokens of its own document"
    )
    positions: Literal["sequence", "document"] = opt(
        "sequence", "RoPE positions: sequence (0..seq_len-1 per packed row) or document (restart at 0 at each "
        "document start)"
    )


@dataclass
class MoE:
    score_func: Literal["", "softmax", "sigmoid"] = opt(
        "", "Router score: '' = the flavor's (Qwen3: softmax with norm_topk_prob), or softmax / sigmoid (DeepSeek-V3)"
    )
    aux_loss_coeff: float = opt(0.0, "Load-balancing auxiliary loss coefficient (Switch / Qwen3; HF uses 0.001)")
    z_loss_coeff: float = opt(0.0, "Router z-loss coefficient (ST-MoE; e.g. 0.001)")
    load_balance_coeff: float = opt(
        0.0, "Aux-loss-free balancing (DeepSeek-V3): per-expert routing bias moved by this much after each "
        "step toward equal load, outside the gradient (e.g. 0.001); 0 = off"
    )
    grouped_mm: bool = opt(True, "Experts compute with one grouped GEMM (torch._grouped_mm); false = a loop per expert")


@dataclass
class Tokenizer:
    path: str = opt(
        "",
        "Tokenizer file: tiktoken format (Llama 3), sentencepiece (Llama 2), or a Hugging Face tokenizer.json "
        "(the file or its folder). Empty = the embedded BPE trained on the Python stdlib (built once, cached)",
    )
    cache_dir: str = opt("", "Where the embedded tokenizer is cached (empty = ~/.cache/torchtitan)")


@dataclass
class Data:
    datasets: list[str] = opt(
        ["stdlib"],
        "Sources: 'stdlib' (embedded, offline), 'c4', 'fineweb_edu', 'hf:<repo>[:<config>]', "
        "or a local file/folder (jsonl, json, parquet, txt). Several = a weighted mixture",
    )
    weights: list[float] = opt([], "Mixture weights, one per dataset (empty = equal)")
    text_field: str = opt("text", "Field holding the document text in json/parquet/HF records")
    decode_errors: Literal["replace", "strict"] = opt(
        "replace", "Local txt/json/jsonl bytes that are not UTF-8: replace with U+FFFD (counted in a warning per "
        "source) or strict (refuse the file)"
    )
    seed: int = opt(0, "Seed of the mixture's source choice and of the window shuffle (resumable)")
    shuffle_windows: int = opt(
        0, "Shuffle packed sequences through a pool of this many (0 = stream order); mixes documents in a batch"
    )
    max_document_tokens: int = opt(
        0, "Split documents into pieces of at most this many tokens, each its own document for block_causal "
        "masking and document positions (flame's context_len; 0 = no split)"
    )
    val_fraction: float = opt(
        0.01, "Fraction of each source held out as its validation split, never trained on: stdlib files by path, "
        "local documents by a hash of their text (hub datasets use their own validation split)"
    )
    stream_retries: int = opt(
        5, "Hub streams: reopen a broken stream at the same document this many times in a row, then fail"
    )
    stream_retry_seconds: float = opt(2.0, "Hub streams: first wait before reopening; doubles per retry, at most 60")
    num_workers: int = opt(0, "DataLoader worker processes (0 = tokenize in the training process)")
    pin_memory: bool = opt(True, "Pin host batches for faster copies to CUDA (ignored on CPU)")


@dataclass
class Optimizer:
    name: Literal["AdamW", "Adam"] = opt("AdamW", "Optimizer")
    lr: float = opt(8e-4, "Peak learning rate")
    beta1: float = opt(0.9, "Adam beta1")
    beta2: float = opt(0.95, "Adam beta2")
    eps: float = opt(1e-8, "Adam epsilon")
    weight_decay: float = opt(0.1, "Decoupled weight decay")
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = opt(
        "auto", "AdamW kernel; auto = fused on CUDA and CPU, foreach elsewhere"
    )


@dataclass
class LRScheduler:
    warmup_steps: int = opt(200, "Linear warmup steps, from lr/(warmup+1) up to lr")
    decay_type: Literal["linear", "cosine", "wsd"] = opt(
        "linear", "Decay after warmup: linear or cosine (over all remaining steps), wsd (stable then decay)"
    )
    decay_ratio: float = opt(
        0.2, "wsd only: fraction of the steps spent in the final decay (the rest after warmup is stable)"
    )
    min_lr_ratio: float = opt(0.0, "The lr decays to lr x min_lr_ratio at the last step")


@dataclass
class Training:
    steps: int = opt(10000, "Optimizer steps to train")
    global_batch_size: int = opt(
        8, "Sequences per optimizer step across all data-parallel ranks (the math)"
    )
    local_batch_size: int = opt(
        -1,
        "Sequences per forward on one rank (the system choice); -1 = global/dp (no accumulation), 0 = auto: "
        "the largest divisor of global/dp whose estimated peak fits memory_limit_gib less memory_margin. "
        "Gradient accumulation = global / (local x dp)",
    )
    memory_limit_gib: float = opt(
        0.0, "Memory per process that local_batch_size = 0 sizes the batch for; 0 = the GPU's total memory "
        "(CUDA), or on CPU the host's memory (or cgroup limit) shared by the processes of this host"
    )
    memory_margin: float = opt(
        0.1, "local_batch_size = 0: the fraction of memory_limit_gib kept free (allocator fragmentation, "
        "runtime, estimate error)"
    )
    oom_retry: bool = opt(
        True, "An out-of-memory error in the forward/backward of the first 3 steps lowers the local batch once "
        "(about half, accumulation up: the same global batch) and retries the step (not under PP)"
    )
    seq_len: int = opt(2048, "Tokens per sequence")
    max_norm: float = opt(1.0, "Gradient clipping max norm (<= 0 disables clipping)")
    loss_chunk_tokens: int = opt(
        2048, "bf16 logits: the fp32 cross-entropy runs over this many tokens at a time (0 = all at once)"
    )
    seed: int = opt(0, "Seed for weights init and everything random")
    deterministic: bool = opt(False, "Use deterministic algorithms (slower; bitwise repeatable on CUDA)")
    skip_nan_inf: bool = opt(
        False, "Skip the update of a step whose loss or grad norm is not finite (counted in metrics)"
    )
    gc_freq: int = opt(50, "Run gc.collect every N steps (automatic GC is off)")
    mixed_precision_param: Literal["", "bfloat16", "float32"] = opt(
        "", "FSDP param dtype (empty = bfloat16 on CUDA, float32 on CPU)"
    )
    mixed_precision_reduce: Literal["float32", "bfloat16"] = opt("float32", "FSDP gradient reduce dtype")
    enable_cpu_offload: bool = opt(
        False, "FSDP: keep sharded params, grads and optimizer state in host memory (CUDA only)"
    )
    max_seconds: float = opt(0.0, "Stop (with a checkpoint if enabled) after this wall time, 0 = no limit")


@dataclass
class Parallelism:
    dp_replicate: int = opt(1, "Data-parallel replicas (DDP, or HSDP's replicate dim)")
    dp_shard: int = opt(-1, "FSDP shard degree; -1 = what is left of the world size")
    tp: int = opt(1, "Tensor-parallel degree")
    pp: int = opt(1, "Pipeline-parallel degree")
    cp: int = opt(1, "Context-parallel degree")
    ep: int = opt(
        1, "Expert-parallel degree (MoE models): experts split over this many of the dp_shard x cp ranks, "
        "tokens sent to them by all-to-all; must divide dp_shard x cp and be a multiple of cp"
    )
    pp_schedule: str = opt("1F1B", "Pipeline schedule name, or a CSV schedule file")
    pp_microbatches: int = opt(
        0, "Pipeline microbatches per local batch (0 = pp degree; multi-stage schedules: the stage count)"
    )
    pp_split_points: list[str] = opt([], "Module names where stages begin, e.g. layers.4 (empty = even split)")
    cp_rotate_method: Literal["allgather", "alltoall"] = opt("allgather", "torch CP backend's K/V rotation")
    cp_backend: Literal["auto", "allgather", "torch"] = opt(
        "auto", "CP attention: allgather (ours, any device), torch (ring attention, CUDA), auto (torch on CUDA)"
    )
    loss_parallel: bool = opt(True, "With TP: compute the loss on vocab-sharded logits")
    fsdp_reshard_after_forward: Literal["default", "always", "never"] = opt(
        "default",
        "FSDP: free gathered params after forward: default (yes, except the last block; no with PP), "
        "always, never (more memory, no re-gather in backward)",
    )


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save and resume checkpoints (DCP)")
    folder: str = opt("checkpoint", "Folder under the dump folder")
    interval: int = opt(500, "Save every N steps or seconds (interval_type), and at the last step")
    load_step: int = opt(-1, "Step to resume from; -1 = the latest complete checkpoint")
    interval_type: Literal["steps", "seconds"] = opt(
        "steps", "Unit of checkpoint.interval (seconds: rank 0's clock decides for all)"
    )
    async_mode: Literal["disabled", "async", "async_with_pinned_mem"] = opt(
        "disabled",
        "disabled (save blocks training) | async (copy to CPU, then a thread writes with DCP on its own gloo "
        "group) | async_with_pinned_mem (copy into shared/pinned memory in the background; a separate "
        "process writes)",
    )
    keep_latest_k: int = opt(
        0, "Keep only the newest k complete checkpoints (0 = keep all); unfinished saves never count"
    )
    model_weights_only: bool = opt(
        False, "The final save (at training.steps) holds only the model weights, cast to export_dtype"
    )
    export_dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "dtype of the weights-only final save")
    create_seed_checkpoint: bool = opt(
        False, "Write step-0 with the freshly initialized weights and exit (1 process only); any layout can start from it"
    )
    exclude_from_loading: list[Literal["model", "optimizer", "lr_scheduler", "dataloader", "train_state"]] = opt(
        [], "State keys not loaded on resume: model, optimizer, lr_scheduler, dataloader, train_state"
    )
    initial_load_path: str = opt(
        "",
        "DCP checkpoint folder whose model weights start a new run (no optimizer, data or step); used only "
        "while this run's own folder has no complete checkpoint",
    )
    hf_export_folder: str = opt(
        "", "After the last step, write the model as a Hugging Face folder of its family (safetensors + "
        "config.json, fp32, + the tokenizer) here; relative paths are under the dump folder; empty = off"
    )


@dataclass
class Metrics:
    log_freq: int = opt(10, "Log every N steps")
    enable_tensorboard: bool = opt(False, "Write TensorBoard events to <dump_folder>/tb")
    save_tb_folder: str = opt("tb", "TensorBoard folder under the dump folder")
    peak_flops: float = opt(
        0.0, "Peak FLOP/s per device for MFU; 0 = bf16 datasheet value for known GPUs (MFU null on CPU)"
    )
    enable_wandb: bool = opt(False, "Log every record to Weights & Biases too (run files under <dump_folder>/wandb)")
    wandb_project: str = opt("torchtitan", "W&B project")
    wandb_entity: str = opt("", "W&B entity (team or user; empty = your default)")
    wandb_run_name: str = opt("", "W&B run name (empty = W&B picks one)")
    wandb_tags: list[str] = opt([], "W&B run tags")
    wandb_mode: Literal["auto", "online", "offline"] = opt(
        "auto", "auto: $WANDB_MODE if set, else online, falling back to an offline run (upload it later with "
        "`wandb sync`) when there is no API key or no network; online: fail instead; offline: never connect"
    )


@dataclass
class Validation:
    enable: bool = opt(False, "Evaluate the loss on held-out data during training (val_loss, val_perplexity)")
    freq: int = opt(500, "Evaluate every N steps, and after the last step")
    steps: int = opt(
        -1, "Batches per evaluation, the same ones each time; -1 = every complete batch of the validation data"
    )
    local_batch_size: int = opt(
        -1, "Sequences per forward on one rank while evaluating (-1 = training's local batch; must equal it "
        "under PP). A batch is local_batch_size x dp sequences"
    )
    datasets: list[str] = opt(
        [], "Validation data: empty = the held-out split of each data.datasets source; else 'stdlib' (its "
        "held-out split), local files/folders (read whole), 'hf:<repo>[:<config>][@<split>]' (default split "
        "'validation'). Several: one val_loss/<name> each"
    )


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "Record torch.profiler traces")
    save_traces_folder: str = opt("profile_traces", "Trace folder under the dump folder")
    profile_freq: int = opt(10, "Trace one step every N steps")
    enable_memory_snapshot: bool = opt(False, "Dump CUDA memory snapshots")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "Snapshot folder under the dump folder")


@dataclass
class Comm:
    init_timeout_seconds: int = opt(300, "Collective timeout until the first step completes")
    train_timeout_seconds: int = opt(100, "Collective timeout after the first step")
    trace_buf_size: int = opt(20000, "NCCL flight recorder entries (0 = off)")


@dataclass
class ActivationCheckpoint:
    mode: Literal["none", "full", "selective"] = opt("none", "Which blocks keep only their input for backward")
    selective_ac_option: str = opt("2", "selective: 'op' (save matmul outputs) or N (every N-th block)")


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each transformer block (and the loss)")
    backend: str = opt("inductor", "torch.compile backend")


@dataclass
class Float8:
    enable_float8_linear: bool = opt(False, "Train Linear layers in float8 (torchao)")
    recipe_name: Literal["tensorwise", "rowwise"] = opt("tensorwise", "torchao float8 scaling recipe")
    enable_fsdp_float8_all_gather: bool = opt(False, "All-gather FSDP params in float8")
    precompute_float8_dynamic_scale_for_fsdp: bool = opt(False, "One all-reduce for all float8 scales")
    filter_fqns: list[str] = opt(["output"], "Linear layers (name substrings) kept in high precision")


@dataclass
class MemoryEstimation:
    enable: bool = opt(False, "Estimate peak memory of this config instead of training")
    disable_fake_mode: bool = opt(False, "Estimate on real tensors (debugging the estimator)")


@dataclass
class Experimental:
    enable_async_tensor_parallel: bool = opt(False, "Overlap TP comms with matmuls (CUDA + compile)")


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    moe: MoE = field(default_factory=MoE)
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    data: Data = field(default_factory=Data)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    experimental: Experimental = field(default_factory=Experimental)

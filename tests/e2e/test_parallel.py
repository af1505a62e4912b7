"""Multi-process parity: every parallel layout trains like one process (gloo on CPU).

Each layout trains the tiny model from the same seed on the same global batches; every
step's loss must match the single-process run within 1e-5 (relative). The default suite
runs one case per family; ``-m slow`` runs the rest. Run with OMP_NUM_THREADS=1.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.helpers.runs import assert_losses_match, read_losses, tiny_overrides, torchrun

STEPS = 5


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(cache_dir):
    """One inductor cache for the session (cold compiles take 15-25 s, warm ones 1-2 s)."""
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = old or str(cache_dir / "inductor")
    yield
    if old is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> dict[int, float]:
    """The single-process run every layout is compared with (computed once per module)."""
    from torchtitan.components.tokenizer import build_tokenizer

    # Build the tokenizer once here, so the layouts' ranks never race to train it.
    build_tokenizer("", str(cache_dir))
    dump = tmp_path_factory.mktemp("ref")
    torchrun(1, tiny_overrides(dump, cache_dir, STEPS))
    return read_losses(dump)


def _check(name: str, nproc: int, extra: list[str], tmp_path: Path, cache_dir: Path, reference) -> None:
    torchrun(nproc, tiny_overrides(tmp_path, cache_dir, STEPS) + extra)
    worst = assert_losses_match(read_losses(tmp_path), reference, rtol=1e-5)
    print(f"\n{name}: worst relative loss difference {worst:.2e}")  # shown with pytest -s


TP = ["--parallelism.tp", "2"]
NO_LOSS_PARALLEL = ["--parallelism.loss_parallel", "false"]
DDP = ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "1"]
HSDP = ["--parallelism.dp_replicate", "2", "--parallelism.dp_shard", "2"]
COMPILE = ["--compile.enable"]
CP = ["--parallelism.cp", "2"]
PP = ["--parallelism.pp", "2"]
ACCUM = ["--training.local_batch_size", "2"]  # 2 rows per forward, global 8 over dp 2: 2 microbatches


def AC(mode: str, option: str = "2") -> list[str]:
    return ["--activation_checkpoint.mode", mode, "--activation_checkpoint.selective_ac_option", option]


slow = pytest.mark.slow
LAYOUTS = [
    # (name, nproc, overrides); the default suite covers every family once.
    pytest.param("fsdp+ac_op+accum", 2, AC("selective", "op") + ACCUM, id="fsdp+ac_op+accum"),
    pytest.param("tp+sp+loss_parallel+ac_full", 2, TP + AC("full"), id="tp+sp+loss_parallel+ac_full"),
    pytest.param("ddp", 2, DDP, id="ddp"),
    pytest.param("fsdp+compile", 2, COMPILE, id="fsdp+compile"),
    pytest.param("hsdp_2x2", 4, HSDP, id="hsdp_2x2"),
    pytest.param("fsdp2xtp2", 4, TP, id="fsdp2xtp2"),
    pytest.param("cp", 2, CP, id="cp"),
    pytest.param("fsdp+cp", 4, CP, id="fsdp+cp"),
    pytest.param("tp+cp+ac_sel2", 4, TP + CP + ["--parallelism.dp_shard", "1"] + AC("selective", "2"),
                 id="tp+cp+ac_sel2", marks=slow),
    pytest.param("fsdp2xtp2xpp2", 8, TP + PP, id="fsdp2xtp2xpp2", marks=slow),
    pytest.param("fsdp", 2, [], id="fsdp", marks=slow),
    pytest.param("fsdp+accum", 2, ACCUM, id="fsdp+accum", marks=slow),
    pytest.param("tp_no_loss_parallel+ac_sel2", 2, TP + NO_LOSS_PARALLEL + AC("selective", "2"),
                 id="tp_no_loss_parallel+ac_sel2", marks=slow),
    pytest.param("tp+sp+compile", 2, TP + COMPILE, id="tp+sp+compile", marks=slow),
    pytest.param("fsdp2xtp2+compile+ac_op", 4, TP + COMPILE + AC("selective", "op"),
                 id="fsdp2xtp2+compile+ac_op", marks=slow),
]


@pytest.mark.parametrize("name,nproc,extra", LAYOUTS)
def test_layout_matches_single_process(name, nproc, extra, tmp_path, cache_dir, reference):
    _check(name, nproc, extra, tmp_path, cache_dir, reference)


# ---- validation: a fake process group, no processes, no training ------------------------


@pytest.fixture
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    def init(world_size: int):
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)

    yield init
    if dist.is_initialized():
        dist.destroy_process_group()


def _parallelize(world_size: int, tp: int, **kw):
    from torchtitan.config.job_config import ActivationCheckpoint, Compile
    from torchtitan.models.llama import Transformer, build_model_args
    from torchtitan.models.llama.parallelize import parallelize_llama
    from torchtitan.parallelisms.parallel_dims import ParallelDims

    dims = ParallelDims(dp_replicate=1, dp_shard=-1, cp=1, tp=tp, pp=1, world_size=world_size)
    dims.build_mesh("cpu")
    with torch.device("meta"):
        model = Transformer(build_model_args("debugmodel_tiny", vocab_size=256, max_seq_len=16))
    return parallelize_llama(model, dims, ActivationCheckpoint(), kw.pop("compile", Compile()), **kw)


def test_tp_not_dividing_heads_is_a_clear_error(fake_world):
    fake_world(4)  # debugmodel_tiny: 4 query heads, 2 kv heads
    with pytest.raises(ValueError, match=r"parallelism.tp=4.*n_heads=4.*n_kv_heads=2"):
        _parallelize(4, tp=4)


def test_async_tp_is_refused_on_cpu(fake_world):
    from torchtitan.config.job_config import Compile, Experimental

    fake_world(2)
    exp = Experimental(enable_async_tensor_parallel=True)
    with pytest.raises(ValueError, match="enable_async_tensor_parallel needs CUDA"):
        _parallelize(2, tp=2, compile=Compile(enable=True), experimental=exp)
    with pytest.raises(ValueError, match="needs compile.enable"):
        _parallelize(2, tp=2, experimental=exp)


def test_async_tp_without_tp_is_a_clear_error(fake_world):
    from torchtitan.config.job_config import Compile, Experimental

    fake_world(2)
    exp = Experimental(enable_async_tensor_parallel=True)
    with pytest.raises(ValueError, match=r"needs parallelism.tp > 1 \(got tp=1\)"):
        _parallelize(2, tp=1, compile=Compile(enable=True), experimental=exp)


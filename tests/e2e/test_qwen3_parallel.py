"""Qwen3 dense and MoE under every layout train like one process (gloo on CPU), and an MoE
run resumes exactly across layouts (expert-parallel checkpoints are layout-independent).

Same recipe as tests/e2e/test_parallel.py: the same seed and global batches; each step's loss must
match the single-process run within 1e-5 (relative). Run with OMP_NUM_THREADS=1.
"""

import json
from pathlib import Path

import pytest

from tests.helpers.runs import assert_losses_match, read_losses, tiny_overrides, torchrun

STEPS = 5
DENSE = ["--model.name", "qwen3", "--model.flavor", "debugmodel_tiny"]
MOE = ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe_tiny"]


def _run(nproc: int, dump: Path, cache: Path, model: list[str], extra: list[str] = (), steps: int = STEPS):
    torchrun(nproc, tiny_overrides(dump, cache, steps) + model + list(extra))
    return read_losses(dump)


@pytest.fixture(scope="module")
def references(tmp_path_factory, cache_dir) -> dict[str, dict[int, float]]:
    from torchtitan.components.tokenizer import build_tokenizer

    build_tokenizer("", str(cache_dir))  # once here, so the layouts' ranks never race to train it
    return {name: _run(1, tmp_path_factory.mktemp(name), cache_dir, model)
            for name, model in (("dense", DENSE), ("moe", MOE))}


@pytest.mark.parametrize("name,nproc,extra", [
    ("fsdp2", 2, []),
    ("tp2", 2, ["--parallelism.tp", "2"]),
    ("pp2", 2, ["--parallelism.pp", "2"]),
])
def test_qwen3_dense_layouts_match_one_process(name, nproc, extra, tmp_path, cache_dir, references):
    worst = assert_losses_match(_run(nproc, tmp_path, cache_dir, DENSE, extra), references["dense"])
    print(f"\nqwen3 dense {name}: worst relative loss difference {worst:.2e}")


EP2 = ["--parallelism.ep", "2"]


@pytest.mark.parametrize("name,nproc,extra", [
    ("ep2", 2, EP2),
    ("fsdp2_x_ep2", 4, EP2),
    ("ep2_x_tp2", 4, EP2 + ["--parallelism.tp", "2"]),
    ("pp2_x_ep2", 4, EP2 + ["--parallelism.pp", "2"]),
    ("ep2_compile_op_ac", 2, EP2 + ["--compile.enable", "--activation_checkpoint.mode", "selective",
                                    "--activation_checkpoint.selective_ac_option", "op"]),
])
def test_qwen3_moe_layouts_match_one_process(name, nproc, extra, tmp_path, cache_dir, references):
    worst = assert_losses_match(_run(nproc, tmp_path, cache_dir, MOE, extra), references["moe"])
    print(f"\nqwen3 moe {name}: worst relative loss difference {worst:.2e}")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["moe_dropped_tokens"] == 0 and r["moe_load_imbalance"] >= 1.0 for r in records), records[-1]


@pytest.mark.parametrize("name,nproc,extra", [
    ("one_process", 1, []),
    pytest.param("ep4", 4, ["--parallelism.ep", "4"], marks=pytest.mark.slow),
    pytest.param("pp2_x_ep2", 4, EP2 + ["--parallelism.pp", "2"], marks=pytest.mark.slow),
])
def test_moe_checkpoint_resumes_exactly_on_another_layout(name, nproc, extra, tmp_path, cache_dir, references):
    """Saved at step 3 under dp_shard 2 x ep 2 (4 ranks), resumed from it under another layout to step 5."""
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", "3"]
    _run(4, tmp_path, cache_dir, MOE, EP2 + ckpt)
    (tmp_path / "metrics.jsonl").unlink()
    resumed = _run(nproc, tmp_path, cache_dir, MOE, ckpt + ["--checkpoint.load_step", "3", *extra])
    reference = {step: loss for step, loss in references["moe"].items() if step > 3}
    worst = assert_losses_match(resumed, reference)
    print(f"\nmoe resume dp_shard2 x ep2 -> {name}: worst relative loss difference {worst:.2e}")

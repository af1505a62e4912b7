"""The planner's model of a run: exact shapes, stage placement, memory and step-time trends, errors."""

import sys
from dataclasses import replace

import pytest
import torch

from tests.helpers.runs import REPO
from torchtitan.models.registry import get_spec
from torchtitan.planner import hardware, search
from torchtitan.planner.layout import Layout, ModelShape, stage_layers
from torchtitan.planner.memory import peak_memory
from torchtitan.planner.step_time import StepTime, Topology, busiest

sys.path.insert(0, str(REPO / "scripts"))
import plan as plan_script  # noqa: E402

H100 = hardware.GPUS["h100"]


@pytest.mark.parametrize("family,flavor", [("llama3", "debugmodel"), ("qwen3", "debugmodel_moe"),
                                           ("qwen3", "0.6B"), ("llama3", "8B")])
def test_shape_counts_the_model_exactly(family, flavor):
    spec = get_spec(family)
    args = spec.build_args(flavor, spec.flavors[flavor].vocab_size, 1024)
    with torch.device("meta"):
        model = spec.model_cls(args)
    nparams, flops = spec.nparams_and_flops(model, args, 1024)
    shape = ModelShape.from_args(family, flavor, args)
    assert shape.params == nparams
    assert shape.flops_per_token(1024) == flops


@pytest.mark.parametrize("schedule,pp", [("1F1B", 4), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2), ("GPipe", 3)])
def test_stages_cover_every_layer_once(schedule, pp):
    shape = ModelShape.from_flavor("llama3", "debugmodel", 256)
    layout = Layout(pp=pp, pp_schedule=schedule, local_bs=8)
    seen, firsts, lasts = [], [], []
    for r in range(pp):
        layers, first, last = stage_layers(shape, layout, r)
        seen += layers
        firsts.append(first)
        lasts.append(last)
    assert sorted(seen) == list(range(shape.n_layers))
    assert firsts.count(True) == 1 and firsts[0]
    # V schedules end on rank 0 (stage 2pp - 1); the others on the last rank.
    assert lasts.count(True) == 1 and lasts[0 if schedule == "ZBVZeroBubble" else -1]


def test_memory_follows_the_layout():
    shape = ModelShape.from_flavor("llama3", "8B", 8192)
    base = Layout(dp_shard=8, local_bs=2, accum=8)

    def total(layout):
        return peak_memory(shape, layout, 8192, 2).total

    assert total(replace(base, ac="full")) < total(replace(base, ac="selective")) < total(base)
    assert total(replace(base, local_bs=1, accum=16)) < total(base)
    assert total(replace(base, dp_shard=4, tp=2)) < total(base)  # TP splits weights and activations
    one = peak_memory(shape, Layout(local_bs=1, accum=2, ac="full"), 8192, 2)
    fsdp8 = peak_memory(shape, Layout(dp_shard=8, local_bs=1, accum=2, ac="full"), 8192, 2)
    assert fsdp8.optimizer == pytest.approx(one.optimizer / 8, rel=1e-3)  # FSDP shards the state
    # ZeRO-2-like PP default keeps every block of the stage gathered: more than resharding.
    pp = Layout(dp_shard=4, pp=2, local_bs=4, accum=4, ac="full")
    assert peak_memory(shape, pp, 8192, 2).other > peak_memory(shape, replace(pp, reshard_after_forward="always"),
                                                               8192, 2).other


def test_step_time_follows_the_layout():
    shape = ModelShape.from_flavor("llama3", "8B", 8192)
    one_node, two_nodes = Topology(8), Topology(4)
    tp = Layout(dp_shard=2, tp=4, local_bs=1, accum=16)
    assert busiest(shape, tp, 8192, H100, two_nodes).tp == pytest.approx(busiest(shape, tp, 8192, H100, one_node).tp)
    fsdp = Layout(dp_shard=8, local_bs=1, accum=16)
    assert busiest(shape, fsdp, 8192, H100, two_nodes).fsdp > busiest(shape, fsdp, 8192, H100, one_node).fsdp
    pp4, pp16 = (Layout(dp_shard=4, pp=2, local_bs=16, pp_microbatches=m) for m in (4, 16))
    assert busiest(shape, pp16, 8192, H100, one_node).bubble < busiest(shape, pp4, 8192, H100, one_node).bubble
    compiled, full_ac = replace(fsdp, compile=True), replace(fsdp, ac="full")
    t = busiest(shape, fsdp, 8192, H100, one_node).compute
    assert busiest(shape, compiled, 8192, H100, one_node).compute < t
    assert busiest(shape, full_ac, 8192, H100, one_node).compute > t
    f8 = replace(fsdp, float8=True)
    assert busiest(shape, f8, 8192, H100, one_node).compute < t


def test_plan_keeps_the_global_batch_and_ranks_fitting_layouts_first():
    shape = ModelShape.from_flavor("llama3", "1B", 4096)
    req = search.PlanRequest(shape, 16, 8, H100, 4096, global_batch=64, allow_cp=True)
    cands = search.plan(req)
    assert cands and all(c.layout.global_batch == 64 and c.layout.world == 16 for c in cands)
    fits = [c.fits for c in cands]
    assert fits == sorted(fits, reverse=True)
    speeds = [c.tokens_per_s for c in cands if c.fits]
    assert speeds == sorted(speeds, reverse=True)
    assert "beats" in search.explain(cands[0], cands[1], 8)


def test_moe_plans_expert_parallel_where_it_helps():
    """235B-A22B on 64 H100 without PP: gathering 128 experts per block over every FSDP rank costs
    more than EP's all-to-alls, and EP shrinks the gathered experts."""
    shape = ModelShape.from_flavor("qwen3", "235B-A22B", 4096)
    req = search.PlanRequest(shape, 64, 8, H100, 4096, global_batch=512, pp_schedules=())
    best = search.plan(req)[0]
    assert best.fits and best.layout.ep > 1
    no_ep = search.plan(replace(req, allow_ep=False))[0]
    assert best.tokens_per_s > no_ep.tokens_per_s


def test_predict_for_config_reads_the_trainer_config():
    from torchtitan.config.manager import ConfigManager

    cfg = ConfigManager().parse_args(["--config", str(REPO / "train_configs" / "llama3_8b.toml")])
    c = search.predict_for_config(cfg, 8, H100)
    assert (c.layout.dp_shard, c.layout.local_bs, c.layout.accum, c.layout.ac) == (8, 1, 1, "selective")
    assert c.fits and 0.2 < c.mfu < 0.7


@pytest.mark.parametrize("argv,needle", [
    (["--gpu", "x100"], "--gpu 'x100' is not in the table"),
    (["--ac", "some"], "--ac 'some'"),
    (["--global_batch_tokens", "1Q"], "--global_batch_tokens '1Q'"),
    (["--pp_schedules", "Foo"], "pp_schedule='Foo'"),
    (["--gpus", "12", "--gpus_per_node", "8"], "not a whole number of nodes"),
    (["--model.flavor", "9B"], "9B"),
    (["--hardware", "/nonexistent.json"], "cannot read it"),
])
def test_bad_plan_inputs_are_one_line_errors(argv, needle):
    with pytest.raises(ValueError, match=None) as e:
        plan_script.run(["--model.flavor", "8B", *argv] if "--model.flavor" not in argv else argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_global_batch_tokens_suffixes():
    assert plan_script.parse_tokens("1M") == 1024**2
    assert plan_script.parse_tokens("512K") == 512 * 1024
    assert plan_script.parse_tokens("4096") == 4096


def _candidate(layout: Layout, **seconds: float) -> search.Candidate:
    time = StepTime(**{"compute": 1.0, **seconds})
    return search.Candidate(layout, None, time, True, 1 / time.total, None)


def test_explanation_uses_the_tables_words():
    fsdp8 = _candidate(Layout(dp_shard=8))
    hsdp = _candidate(Layout(dp_replicate=2, dp_shard=4), dp=0.1)
    assert "replica all-reduce inside the node" in search.explain(fsdp8, hsdp, gpus_per_node=8)
    assert "replica all-reduce across nodes" in search.explain(fsdp8, hsdp, gpus_per_node=4)
    for option, words in (("op", "AC op"), ("2", "AC selective 2")):
        checkpointed = _candidate(Layout(dp_shard=8, ac="selective", ac_option=option), compute=1.2)
        line = search.explain(fsdp8, checkpointed, gpus_per_node=8)
        assert f"({checkpointed.layout.describe()})" in line and checkpointed.layout.describe() == f"fsdp8 | {words}"
        assert f"recomputation under {words})" in line


def test_plan_of_the_debug_config_on_cpu(capsys):
    """The run's vocabulary (the embedded tokenizer's 4096, not the flavor's 2048); no MFU against the
    nominal CPU row's placeholder peak (it printed "0 TFLOPs" beside "MFU 54.9%")."""
    plan_script.run(["--config", str(REPO / "train_configs" / "debug_model.toml"), "--gpu", "cpu", "--top", "3"])
    out = capsys.readouterr().out
    header, note = out.splitlines()[:2]
    assert "vocab 4096;" in header and note.startswith("vocab 4096: the embedded tokenizer's")
    assert "TFLOPs" not in header and "peak n/a: uncalibrated" in header
    rows = [line for line in out.splitlines() if line.startswith("  ")]
    assert len(rows) == 4 and all(row.endswith("n/a") for row in rows[1:]) and "%" not in "".join(rows)
    measured = replace(hardware.GPUS["cpu"], peak_known=True, peak_tflops=0.08)
    assert measured.describe_peak() == "80.0 GFLOP/s fp32" and H100.describe_peak() == "989 TFLOPs bf16"

"""Validation during training: held-out splits, the Validator's numbers, and that training does not feel it.

Unit tests run a tiny model in this process (no process group); the end-to-end ones train through
``train.py`` in child processes: bit-for-bit training losses with and without validation (also across a
resume), the logged val_loss against one recomputed by hand from the saved weights, the W&B offline run,
and the same val_loss under other layouts (FSDP here; FSDP2 x TP2, PP2 and a V-shaped schedule marked slow).
"""

import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.runs import torchrun
from tests.helpers.runs import metrics, run, tiny_args
from torchtitan.components.metrics import MetricsLogger
from torchtitan.components.model_builder import BuiltModel, build_model_args
from torchtitan.components.train_step import ForwardBackward
from torchtitan.components.validation import Validator, check_config, source_names
from torchtitan.config.job_config import Data, JobConfig, Metrics, Validation
from torchtitan.datasets.sources import EndOfSplit, build_source
from torchtitan.datasets.stdlib_corpus import held_out, read_document, stdlib_files, stdlib_root
from torchtitan.models.moe import moe_modules
from torchtitan.models.registry import get_spec

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class ByteTokenizer:
    bos_id, eos_id, n_words = 0, 1, 258

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [b + 2 for b in text.encode()] + [self.eos_id] * eos


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def read_all(source) -> list[str]:
    """Every document of a one-pass (validation) source, up to its EndOfSplit."""
    out, documents = [], iter(source)
    with pytest.raises(EndOfSplit):
        while True:
            out.append(next(documents))
    return out


# ---- held-out split of local data -------------------------------------------------------------------


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A folder of two jsonl shards and a txt file; one text appears in both shards."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [f"document {i}: " + "word " * (i % 9) for i in range(300)]
    write_jsonl(folder / "a.jsonl", texts[:150] + ["a duplicated document"])
    write_jsonl(folder / "b.jsonl", texts[150:] + ["a duplicated document"])
    (folder / "c.txt").write_text("a whole text file")
    # In reading order: files sorted by name, records in file order.
    return folder, [*texts[:150], "a duplicated document", *texts[150:], "a duplicated document", "a whole text file"]


def test_local_held_out_split_is_disjoint_stable_and_resumes_exactly(corpus):
    folder, every = corpus
    cfg = Data(datasets=[str(folder)], val_fraction=0.2)
    val = read_all(build_source(cfg, "validation"))
    assert val == read_all(build_source(cfg, "validation"))  # stable: the same documents, same order
    assert val == [t for t in every if held_out(t, 0.2)]  # exactly the documents whose text hashes below 0.2
    assert 0.1 * len(every) < len(val) < 0.3 * len(every)
    documents = iter(build_source(cfg, "train"))
    train_epoch = [next(documents) for _ in range(len(every) - len(val))]
    assert sorted(train_epoch + val) == sorted(every)  # disjoint, and together every document
    assert not set(train_epoch) & set(val)  # the duplicated text is on one side only
    assert next(documents) == train_epoch[0]  # training loops; validation ended

    source = build_source(cfg, "train")  # resume mid-epoch: skipped held-out records count too
    documents = iter(source)
    first = [next(documents) for _ in range(37)]
    state = source.state_dict()
    rest = [next(documents) for _ in range(60)]
    fresh = build_source(cfg, "train")
    fresh.load_state_dict(state)
    assert first == train_epoch[:37]
    documents = iter(fresh)
    assert [next(documents) for _ in range(60)] == rest


def test_stdlib_split_follows_the_hash_of_the_path():
    root, train, val = stdlib_root(), stdlib_files("train"), stdlib_files("validation")
    assert val and sorted(train + val) == sorted(stdlib_files("all"))
    assert all(held_out(p.relative_to(root).as_posix(), 0.01) for p in val)
    assert not any(held_out(p.relative_to(root).as_posix(), 0.01) for p in train)


def test_empty_held_out_split_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ["only document"])
    with pytest.raises(ValueError, match=r"no documents in its validation split.*data.val_fraction=0.0"):
        read_all(build_source(Data(datasets=[str(path)], val_fraction=0.0), "validation"))
    with pytest.raises(ValueError, match=r"data.val_fraction=1.5 is not a fraction"):
        build_source(Data(val_fraction=1.5), "train")


# ---- the Validator on a tiny model, in this process -----------------------------------------------------


def tiny_model(name: str = "llama3", flavor: str = "debugmodel_tiny") -> BuiltModel:
    cfg = JobConfig()
    cfg.model.name, cfg.model.flavor, cfg.training.seq_len = name, flavor, SEQ_LEN
    spec = get_spec(name)
    args = build_model_args(cfg, spec, ByteTokenizer.n_words)
    torch.manual_seed(0)
    model = spec.model_cls(args)
    return BuiltModel(spec, args, model, [model], None, 0, 0)


ONE_PROCESS = SimpleNamespace(tp=1, tp_enabled=False, fsdp_enabled=False, pp_enabled=False, dp=1, dp_rank=0)


def validator(built: BuiltModel, data: Data, **cfg) -> Validator:
    step_fn = ForwardBackward(JobConfig().training, ONE_PROCESS, torch.device("cpu"), None, 2, 1, False)
    step_fn.attach(built)
    cfg = Validation(enable=True, freq=1, **cfg)
    return Validator(cfg, data, ByteTokenizer(), SEQ_LEN, ONE_PROCESS, step_fn, built.parts, torch.device("cpu"), 2)


def reference_loss(model: torch.nn.Module, texts: list[str], n_windows: int) -> float:
    """Token-weighted cross-entropy of the first ``n_windows`` packed windows, computed from scratch:
    bos + text + eos of each document, concatenated, cut into windows of seq_len + 1."""
    stream = [t for text in texts for t in ByteTokenizer().encode(text, bos=True, eos=True)]
    windows = torch.tensor(stream[: n_windows * (SEQ_LEN + 1)]).view(n_windows, SEQ_LEN + 1)
    with torch.no_grad():
        logits = model(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten(), reduction="mean").item()


def test_val_loss_is_the_token_mean_over_every_complete_batch(tmp_path):
    texts = [f"validation text {i} " * (1 + i % 5) for i in range(40)]
    write_jsonl(tmp_path / "val.jsonl", texts)
    built = tiny_model()
    v = validator(built, Data(), datasets=[str(tmp_path / "val.jsonl")], steps=-1)
    n_tokens = sum(len(ByteTokenizer().encode(t, True, True)) for t in texts)
    complete = n_tokens // (SEQ_LEN + 1) // 2 * 2  # whole windows, in whole batches of local 2 x dp 1
    rng = torch.get_rng_state()
    first, second = v.run(), v.run()
    assert torch.equal(rng, torch.get_rng_state())  # the loaders' seeding did not move training's RNG
    assert all(m.training for m in built.model.modules())
    assert first["val_loss"] == second["val_loss"]  # the same batches every evaluation
    assert first["val_tokens"] == complete * SEQ_LEN
    assert first["val_loss"] == pytest.approx(reference_loss(built.model, texts, complete), rel=1e-6)
    assert first["val_perplexity"] == pytest.approx(math.exp(first["val_loss"]), rel=1e-12)
    three = validator(built, Data(), datasets=[str(tmp_path / "val.jsonl")], steps=3).run()
    assert three["val_tokens"] == 3 * 2 * SEQ_LEN
    assert three["val_loss"] == pytest.approx(reference_loss(built.model, texts, 6), rel=1e-6)


def test_several_sources_log_each_and_the_token_weighted_total(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"first source {i} " * 3 for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [f"second {i} " * 7 for i in range(20)])
    built = tiny_model()
    both = validator(built, Data(), datasets=[str(a), str(b)], steps=2).run()
    alone = [validator(built, Data(), datasets=[str(p)], steps=2).run() for p in (a, b)]
    assert both["val_loss/a.jsonl"] == alone[0]["val_loss"] and both["val_loss/b.jsonl"] == alone[1]["val_loss"]
    assert both["val_loss"] == pytest.approx((alone[0]["val_loss"] + alone[1]["val_loss"]) / 2, rel=1e-12)
    assert source_names(["stdlib", "hf:org/x:en@test", "/d/one", "/e/one"]) == [
        "stdlib", "org/x:en@test", "/d/one", "/e/one"]


def test_moe_routing_counts_of_the_evaluation_are_dropped(tmp_path):
    write_jsonl(tmp_path / "val.jsonl", [f"moe text {i} " * 4 for i in range(30)])
    built = tiny_model("qwen3", "debugmodel_moe_tiny")
    moes = list(moe_modules(built.model).values())
    assert moes
    validator(built, Data(), datasets=[str(tmp_path / "val.jsonl")], steps=2).run()
    assert all(m.pop_stats()["forwards"].item() == 0 for m in moes)


def test_default_validates_on_the_held_out_split_of_each_training_source(corpus):
    folder, every = corpus
    built = tiny_model()
    held = [t for t in every if held_out(t, 0.2)]
    out = validator(built, Data(datasets=[str(folder)], val_fraction=0.2), steps=1).run()
    assert out["val_loss"] == pytest.approx(reference_loss(built.model, held, 2), rel=1e-6)


@pytest.mark.parametrize("cfg, message", [
    (dict(freq=0), r"validation.freq=0 must be a positive number of steps"),
    (dict(steps=0), r"validation.steps=0 must be a positive number of batches, or -1"),
    (dict(local_batch_size=0), r"validation.local_batch_size=0 must be positive"),
])
def test_bad_validation_config_is_one_line(cfg, message):
    with pytest.raises(ValueError, match=message) as err:
        check_config(Validation(enable=True, **cfg), 2, pp_enabled=False)
    assert "\n" not in str(err.value)


def test_bad_validation_data_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"validation.local_batch_size=3 differs from the training local batch 2"):
        check_config(Validation(enable=True, local_batch_size=3), 2, pp_enabled=True)
    with pytest.raises(ValueError, match=r"validation.datasets entry '.*no/such': .*not a known name nor an "
                                         r"existing path") as err:
        validator(tiny_model(), Data(), datasets=[str(tmp_path / "no/such")])
    assert "\n" not in str(err.value)
    small = write_jsonl(tmp_path / "small.jsonl", ["too short"])
    with pytest.raises(ValueError, match=r"validation data 'small.jsonl' holds fewer than one batch"):
        validator(tiny_model(), Data(), datasets=[str(small)])


def test_a_missing_validation_path_ends_train_py_with_one_line(tmp_path, cache_dir):
    proc = run(tiny_args(tmp_path, cache_dir, 2, "--validation.enable", "--validation.datasets",
                         str(tmp_path / "no_such_val")), check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert "error: ValueError: validation.datasets entry" in line and "no_such_val" in line
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()


# ---- W&B --------------------------------------------------------------------------------------------------


def wandb_records(dump: Path) -> tuple[list, dict[int, dict]]:
    """(run records, history by step) of the one offline run under ``dump``: the .wandb file is a
    LevelDB-style log (7-byte header, 32 KiB blocks of crc32 / length / type chunks) of Record protos."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = dump.glob("wandb/offline-run-*/run-*.wandb")
    data, pos, pending, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history[items["_step"]] = items
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return runs, history


def test_wandb_auto_without_an_api_key_writes_an_offline_run(tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login either
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))
    cfg = Metrics(enable_wandb=True, wandb_run_name="auto-run", wandb_tags=["unit"])
    m = MetricsLogger(cfg, str(tmp_path), torch.device("cpu"), 1.0, 1, 2, is_logging_rank=True)
    m.record_validation(1, {"val_loss": 2.5, "val_perplexity": math.exp(2.5), "val_tokens": 10,
                            "val_seconds": 0.1}, merge=False)
    m.log(2, 3.0, 1.0, 1e-3)
    m.close()
    runs, history = wandb_records(tmp_path)
    assert runs[0].display_name == "auto-run" and list(runs[0].tags) == ["unit"]
    assert history[1]["val_loss"] == 2.5 and history[2]["loss"] == 3.0
    assert history[2]["perplexity"] == pytest.approx(math.exp(3.0))


# ---- end to end: train.py --------------------------------------------------------------------------------

VALIDATION = ["--validation.enable", "--validation.freq", "2", "--validation.steps", "3"]
CHECKPOINTS = ["--checkpoint.enable", "--checkpoint.interval", "2"]
WANDB = ["--metrics.enable_wandb", "--metrics.wandb_mode", "offline", "--metrics.wandb_run_name", "tiny",
         "--metrics.wandb_tags", "ci,validation"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, cache_dir) -> dict[int, dict]:
    dump = tmp_path_factory.mktemp("plain")
    run(tiny_args(dump, cache_dir, 4))
    return metrics(dump)


@pytest.fixture(scope="module")
def validated(tmp_path_factory, cache_dir) -> Path:
    dump = tmp_path_factory.mktemp("validated")
    run(tiny_args(dump, cache_dir, 4, *VALIDATION, *CHECKPOINTS, *WANDB, "--metrics.enable_tensorboard"))
    return dump


def test_validation_leaves_training_bit_for_bit_and_logs_its_records(plain, validated):
    m = metrics(validated)
    assert sorted(m) == [1, 2, 3, 4]
    for step in m:
        assert m[step]["loss"] == plain[step]["loss"], step
        assert m[step]["grad_norm"] == plain[step]["grad_norm"], step
        assert m[step]["perplexity"] == pytest.approx(math.exp(m[step]["loss"]), rel=1e-12)
    assert [s for s in m if "val_loss" in m[s]] == [2, 4]
    assert m[4]["val_tokens"] == 3 * 2 * 64  # steps x local batch x seq_len
    assert m[4]["val_perplexity"] == pytest.approx(math.exp(m[4]["val_loss"]), rel=1e-12)
    assert m[4]["val_loss"] < m[2]["val_loss"]  # the same batches, a trained model


def test_validation_after_a_resume_is_exact(plain, validated, tmp_path, cache_dir):
    (tmp_path / "checkpoint").mkdir()
    shutil.copytree(validated / "checkpoint" / "step-2", tmp_path / "checkpoint" / "step-2")
    run(tiny_args(tmp_path, cache_dir, 4, *VALIDATION, *CHECKPOINTS))
    resumed, first = metrics(tmp_path), metrics(validated)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step]["loss"] == plain[step]["loss"], step
    assert resumed[4]["val_loss"] == first[4]["val_loss"]


def test_val_loss_matches_the_saved_model_on_the_first_held_out_windows(validated, tmp_path, cache_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from torchtitan.components.tokenizer import build_tokenizer
    from torchtitan.config.manager import ConfigManager

    dcp_to_torch_save(validated / "checkpoint" / "step-4", tmp_path / "flat.pt")
    weights = torch.load(tmp_path / "flat.pt", weights_only=True)["model"]
    cfg = ConfigManager().parse_args(tiny_args(tmp_path, cache_dir, 4))
    tokenizer = build_tokenizer("", str(cache_dir))
    spec = get_spec(cfg.model.name)
    model = spec.model_cls(build_model_args(cfg, spec, tokenizer.n_words))
    model.load_state_dict(weights)
    documents = (read_document(p) for p in stdlib_files("validation"))  # in corpus order, unshuffled
    stream = [t for d in documents for t in tokenizer.encode(d, bos=True, eos=True)][: 6 * 65]
    # 6 windows = 3 batches of local 2 x dp 1, seq_len 64 + 1
    windows = torch.tensor(stream).view(6, 65)
    with torch.no_grad():
        logits = model(windows[:, :-1])
    expected = F.cross_entropy(logits.flatten(0, 1).double(), windows[:, 1:].flatten()).item()
    assert metrics(validated)[4]["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_wandb_offline_run_and_tensorboard_hold_the_records(validated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    m = metrics(validated)
    runs, history = wandb_records(validated)
    assert runs[0].display_name == "tiny" and list(runs[0].tags) == ["ci", "validation"]
    assert sorted(history) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert history[step]["loss"] == m[step]["loss"] and history[step]["perplexity"] == m[step]["perplexity"]
    assert history[4]["val_loss"] == m[4]["val_loss"] and history[2]["val_perplexity"] == m[2]["val_perplexity"]
    events = EventAccumulator(str(validated / "tb")).Reload()
    assert [e.value for e in events.Scalars("val_loss")] == pytest.approx([m[2]["val_loss"], m[4]["val_loss"]])


def test_plot_draws_validation_beside_training(validated, tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    import plot_metrics

    records = plot_metrics.read_metrics(validated / "metrics.jsonl")
    assert [s for s, _ in plot_metrics.series(records, "val_loss")] == [2, 4]
    out = tmp_path / "m.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(validated / "metrics.jsonl"),
                           "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _val_losses(dump: Path) -> dict[int, float]:
    return {s: r["val_loss"] for s, r in metrics(dump).items() if "val_loss" in r}


def _assert_val_close(got: dict[int, float], ref: dict[int, float]) -> None:
    assert got.keys() == ref.keys()
    for step in ref:
        assert abs(got[step] - ref[step]) <= 1e-5 * abs(ref[step]), (step, got[step], ref[step])


LAYOUTS = {  # name -> (processes, flags); validation batches of 2 sequences as in the one-process run
    "fsdp2_tp2": (4, ["--parallelism.tp", "2", "--validation.local_batch_size", "1"]),  # loss parallel
    "pp2": (2, ["--parallelism.pp", "2"]),  # 1F1B: the schedule's forward-only eval()
}
SLOW_LAYOUTS = {
    "cp2": (2, ["--parallelism.cp", "2"]),
    "tp2_no_loss_parallel": (2, ["--parallelism.tp", "2", "--parallelism.no_loss_parallel"]),
    "pp2_zbv": (2, ["--parallelism.pp", "2", "--parallelism.pp_schedule", "ZBVZeroBubble",
                    "--parallelism.pp_microbatches", "2", "--model.n_layers", "4"]),  # V-shaped: stage by stage
}


def _reference(validated: Path, flags: list[str], tmp_path: Path, cache_dir: Path) -> Path:
    if "--model.n_layers" not in flags:
        return validated
    one = tmp_path / "one"  # a V schedule needs 4 stages: one process at 4 layers
    run(tiny_args(one, cache_dir, 4, *VALIDATION, "--model.n_layers", "4"))
    return one


@pytest.mark.parametrize("layout", [*LAYOUTS, *(pytest.param(k, marks=pytest.mark.slow) for k in SLOW_LAYOUTS)])
def test_val_loss_is_the_same_under_other_layouts(validated, tmp_path, cache_dir, layout):
    nproc, flags = {**LAYOUTS, **SLOW_LAYOUTS}[layout]
    torchrun(nproc, tiny_args(tmp_path, cache_dir, 4, *VALIDATION, *flags))
    _assert_val_close(_val_losses(tmp_path), _val_losses(_reference(validated, flags, tmp_path, cache_dir)))


@pytest.mark.slow
@pytest.mark.parametrize("nproc, flags", [
    (2, ["--parallelism.pp", "2"]),
    (2, ["--parallelism.cp", "2"]),
    (1, ["--compile.enable", "--activation_checkpoint.mode", "full"]),
    (2, ["--float8.enable_float8_linear", "--validation.local_batch_size", "1"]),  # FSDP2 + float8
    (2, ["--model.name", "qwen3", "--model.flavor", "debugmodel_moe_tiny", "--moe.load_balance_coeff", "0.01",
         "--parallelism.ep", "2", "--validation.local_batch_size", "1"]),  # MoE, EP2, balancing bias
], ids=["pp2", "cp2", "compile_ac", "fsdp2_float8", "moe_ep2"])
def test_training_is_bit_for_bit_with_validation_under(tmp_path, cache_dir, nproc, flags):
    torchrun(nproc, tiny_args(tmp_path / "a", cache_dir, 4, *flags))
    torchrun(nproc, tiny_args(tmp_path / "b", cache_dir, 4, *flags, *VALIDATION))
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [(a[s]["loss"], a[s]["grad_norm"]) for s in a] == [(b[s]["loss"], b[s]["grad_norm"]) for s in b]
    assert [s for s in b if "val_loss" in b[s]] == [2, 4]

"""Tests of the data pipeline: sources, packing, the distributed loader and its state.

Everything is local: the stdlib corpus (restricted to a few files for speed), small
files written to tmp_path, and a fake in place of the Hugging Face hub.
"""

from collections import Counter
import functools
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from torchtitan.config.job_config import Data
from torchtitan.datasets import sources
from torchtitan.datasets.dataloader import build_dataloader
from torchtitan.datasets.packing import PackedDataset
from torchtitan.datasets.sources import FileListSource, HFSource, MixtureSource, build_source
from torchtitan.datasets.stdlib_corpus import stdlib_files

SEQ_LEN, GLOBAL_BATCH = 64, 4

# torchdata calls a torch API that torch now deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")


class ByteTokenizer:
    """ids = bytes + 2, bos = 0, eos = 1 (module level so DataLoader workers can pickle it)."""

    bos_id, eos_id, n_words = 0, 1, 258

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [b + 2 for b in text.encode()] + [self.eos_id] * eos


def stream_of(texts: list[str]) -> list[int]:
    return [t for text in texts for t in ByteTokenizer().encode(text, bos=True, eos=True)]


@functools.lru_cache
def _few_stdlib_files(split: str) -> tuple:
    # Listing the stdlib takes ~2 s; list it once and keep a few files.
    return tuple(stdlib_files(split, 0.01)[:12])


@pytest.fixture
def small_stdlib(monkeypatch):
    monkeypatch.setattr(sources, "stdlib_files", lambda split, val_fraction: list(_few_stdlib_files(split)))


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


@pytest.fixture
def mixture_cfg(tmp_path):
    """Two local datasets: a jsonl folder and a txt folder, mixed 2:1."""
    (tmp_path / "jsonl").mkdir()
    for shard in range(2):
        texts = [f"json shard {shard} document {i} " * (i % 7 + 1) for i in range(30)]
        write_jsonl(tmp_path / "jsonl" / f"part{shard}.jsonl", texts)
    (tmp_path / "txt").mkdir()
    for i in range(20):
        (tmp_path / "txt" / f"doc{i:02d}.txt").write_text(f"plain text file {i}\n" * (i % 5 + 1))
    return Data(datasets=[str(tmp_path / "jsonl"), str(tmp_path / "txt")], weights=[2.0, 1.0])


def loader(cfg, dp_rank=0, dp_degree=1, seq_len=SEQ_LEN, split="train"):
    return build_dataloader(cfg, ByteTokenizer(), seq_len, GLOBAL_BATCH, dp_rank, dp_degree, split)


def take(dl, n: int) -> list:
    return [next(dl) for _ in range(n)]


def tokens(batches: list[dict]) -> torch.Tensor:
    return torch.cat([b["tokens"] for b in batches])


def cat_batches(batches: list[dict]) -> dict:
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys() == {"tokens", "positions"}
        assert all(torch.equal(a[key], b[key]) for key in a)


# (a) resume equality ---------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("corpus", ["stdlib", "mixture"])
def test_resume_continues_exactly(corpus, num_workers, small_stdlib, mixture_cfg):
    cfg = Data(num_workers=num_workers) if corpus == "stdlib" else mixture_cfg
    cfg.num_workers = num_workers
    dl = loader(cfg)
    # 23 batches: past the first documents; odd, so that with 2 workers the resume
    # starts on the second worker.
    take(dl, 23)
    state = dl.state_dict()
    reference = take(dl, 12)

    resumed = loader(cfg)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 12), reference)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shuffled_windows_resume_exactly_and_mix_the_stream(num_workers, small_stdlib):
    plain = tokens(take(loader(Data()), 40 + 16 // GLOBAL_BATCH + 1))
    cfg = Data(shuffle_windows=16, seed=3, num_workers=num_workers)
    dl = loader(cfg)
    first = take(dl, 21)
    state = dl.state_dict()
    reference = take(dl, 19)
    resumed = loader(cfg)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 19), reference)
    shuffled = tokens(first + reference)
    assert not torch.equal(shuffled, plain[: len(shuffled)])  # the order changed ...
    rows = lambda t: Counter(tuple(r.tolist()) for r in t)  # noqa: E731
    assert rows(shuffled) <= rows(plain)  # ... every window comes from the stream, once ...
    missing = rows(plain[: len(shuffled)]) - rows(shuffled)
    assert sum(missing.values()) <= 16  # ... and at most a pool's worth still waits in the pool
    with pytest.raises(ValueError, match="shuffle_windows: saved 16, current 0"):
        loader(Data(seed=3)).load_state_dict(state)


@pytest.mark.parametrize("corpus", ["stdlib", "mixture"])
def test_workers_do_not_change_the_stream(corpus, small_stdlib, mixture_cfg):
    cfg = Data() if corpus == "stdlib" else mixture_cfg
    cfg.num_workers = 0
    single = take(loader(cfg), 7)
    cfg.num_workers = 2
    assert_same(take(loader(cfg), 7), single)


def test_mixture_draws_by_weight(tmp_path):
    a = FileListSource([write_jsonl(tmp_path / "a.jsonl", ["a"] * 10)])
    b = FileListSource([write_jsonl(tmp_path / "b.jsonl", ["b"] * 10)])
    picks = take(iter(MixtureSource([a, b], [3.0, 1.0], seed=0)), 4000)
    assert 0.72 < picks.count("a") / len(picks) < 0.78


# (b) layout independence ------------------------------------------------------


def test_dp_ranks_partition_the_global_batch(small_stdlib):
    cfg = Data()
    global_batches = take(loader(cfg), 6)
    rank0, rank1 = loader(cfg, 0, 2), loader(cfg, 1, 2)
    for global_BL in global_batches:
        rows0, rows1 = next(rank0), next(rank1)
        assert rows0["tokens"].shape == rows0["positions"].shape == (GLOBAL_BATCH // 2, SEQ_LEN + 1)
        assert_same([cat_batches([rows0, rows1])], [global_BL])
    assert rank0.state_dict() == rank1.state_dict()  # saved once, valid for every rank


@pytest.mark.parametrize("new_dp", [1, 4])
def test_state_saved_at_dp2_resumes_at_other_dp(new_dp, small_stdlib):
    cfg = Data()
    reference = take(loader(cfg), 7)[3:]  # global batches 3..6
    rank0 = loader(cfg, 0, 2)
    take(rank0, 3)
    state = rank0.state_dict()

    ranks = [loader(cfg, r, new_dp) for r in range(new_dp)]
    for dl in ranks:
        dl.load_state_dict(state)
    for global_BL in reference:
        assert_same([cat_batches([next(dl) for dl in ranks])], [global_BL])


# (c) refusing a state saved for another stream ---------------------------------


def test_load_refuses_a_different_stream(small_stdlib):
    state = loader(Data()).state_dict()
    with pytest.raises(ValueError, match=r"seq_len: saved 64, current 32"):
        loader(Data(), seq_len=32).load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed: saved 0, current 5"):
        loader(Data(seed=5)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"version"):
        loader(Data()).load_state_dict({**state, "version": 99})


# (d) packing -------------------------------------------------------------------


def test_windows_are_the_concatenated_document_stream(tmp_path):
    texts = ["first document", "", "third, a longer one " * 9, "x"]
    source = FileListSource([write_jsonl(tmp_path / "d.jsonl", texts)])
    windows = iter(PackedDataset(source, ByteTokenizer(), seq_len=16))
    got = [next(windows) for _ in range(30)]
    assert all(w["tokens"].dtype == torch.int64 and w["tokens"].shape == (17,) for w in got)
    expected = stream_of(texts) * 4  # the source loops over its epochs
    assert tokens(got).tolist() == expected[: 30 * 17]
    assert stream_of([""]) == [0, 1]  # an empty document is just bos, eos


def test_packed_resume_inside_a_long_document(tmp_path):
    source = FileListSource([write_jsonl(tmp_path / "d.jsonl", ["a" * 300, "b" * 50])])
    dataset = PackedDataset(source, ByteTokenizer(), seq_len=16)
    windows = iter(dataset)
    take(windows, 5)
    state = dataset.state_dict()
    assert len(state["buffer"]) > 17  # the long document's rest waits in the buffer
    reference = take(windows, 25)
    fresh = PackedDataset(FileListSource(source.files), ByteTokenizer(), seq_len=16)
    fresh.load_state_dict(state)
    assert_same(take(iter(fresh), 25), reference)


# (e) local formats -------------------------------------------------------------

TEXTS = ["alpha", "", "gamma gamma", "delta " * 5, "epsilon"]


def write_format(tmp_path, fmt: str):
    if fmt == "jsonl":
        return [write_jsonl(tmp_path / "d.jsonl", TEXTS, field="content")]
    if fmt == "json":
        (tmp_path / "d.json").write_text(json.dumps([{"content": t} for t in TEXTS]))
        return [tmp_path / "d.json"]
    if fmt == "parquet":
        table = pa.table({"content": TEXTS, "n": list(range(len(TEXTS)))})
        pq.write_table(table, tmp_path / "d.parquet", row_group_size=2)
        return [tmp_path / "d.parquet"]
    for i, text in enumerate(TEXTS):  # txt: one document per file, sorted by name
        (tmp_path / "sub").mkdir(exist_ok=True)
        (tmp_path / "sub" / f"{i}.txt").write_text(text)
    return sources.local_files(str(tmp_path))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "txt"])
def test_local_formats_read_and_resume(tmp_path, fmt):
    source = FileListSource(write_format(tmp_path, fmt), text_field="content")
    documents = iter(source)
    assert take(documents, len(TEXTS)) == TEXTS
    take(documents, 3)  # into the second epoch
    state = source.state_dict()
    assert state["epoch"] == 1
    reference = take(documents, 6)
    fresh = FileListSource(source.files, text_field="content")
    fresh.load_state_dict(state)
    assert take(iter(fresh), 6) == reference == TEXTS[3:] + TEXTS[:4]


def test_build_source_reads_a_folder_with_a_custom_field(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ["from b"], field="body")
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "z.jsonl", ["from a/z"], field="body")
    source = build_source(Data(datasets=[str(tmp_path)], text_field="body"))
    assert take(iter(source), 3) == ["from a/z", "from b", "from a/z"]


# (f) errors --------------------------------------------------------------------


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"no/such/dir.*accepted: 'stdlib'"):
        build_source(Data(datasets=[str(tmp_path / "no/such/dir")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no"):
        build_source(Data(datasets=[str(tmp_path / "empty")]))
    with pytest.raises(ValueError, match=r"2 entries but data.datasets has 1"):
        build_source(Data(weights=[1.0, 2.0]))
    with pytest.raises(ValueError, match=r"positive"):
        build_source(Data(datasets=["stdlib", "stdlib"], weights=[1.0, 0.0]))
    local = str(write_jsonl(tmp_path / "d.jsonl", ["x"]))
    with pytest.raises(ValueError, match=r"divisible"):
        build_dataloader(Data(datasets=[local]), ByteTokenizer(), 8, 6, 0, 4)


def test_too_short_and_empty_datasets_are_refused(tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", ["a", "bc"])
    dl = loader(Data(datasets=[str(short)]))
    too_short = r"has 7 tokens per epoch, fewer than one sequence of seq_len\+1 = 65"
    with pytest.raises(ValueError, match=too_short):
        next(dl)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"has no documents"):
        next(loader(Data(datasets=[str(tmp_path / "empty.jsonl")])))
    with pytest.raises(ValueError, match=r"no text field 'text'"):
        next(iter(FileListSource([write_jsonl(tmp_path / "f.jsonl", ["x"], field="body")])))


# (g) the Hugging Face hub path, with a fake hub ------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    import datasets

    calls = []

    def records(n):
        for i in range(n):
            yield {"text": f"hub document {i}", "url": f"u{i}"}

    def fake_load_dataset(path, name=None, split=None, streaming=False):
        calls.append((path, name, split, streaming))
        return datasets.IterableDataset.from_generator(records, gen_kwargs={"n": 5})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub reachability probe: the fake hub needs no network
    return calls


def test_hub_aliases_build_the_right_load_dataset_call(fake_hub):
    build_source(Data(datasets=["c4"]))
    build_source(Data(datasets=["fineweb_edu"]))
    build_source(Data(datasets=["hf:org/repo:cfg", "hf:org/other"]), split="validation")
    assert fake_hub == [
        ("allenai/c4", "en", "train", True),
        ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True),
        ("org/repo", "cfg", "validation", True),
        ("org/other", None, "validation", True),
    ]


def test_hub_source_loops_and_resumes_exactly(fake_hub):
    source = HFSource("allenai/c4", "en")
    documents = iter(source)
    first_epoch = take(documents, 5)
    assert first_epoch == [f"hub document {i}" for i in range(5)]
    take(documents, 2)  # into the second epoch
    state = source.state_dict()
    reference = take(documents, 6)
    assert reference == first_epoch[2:] + first_epoch[:3]
    fresh = HFSource("allenai/c4", "en")
    fresh.load_state_dict(state)
    assert take(iter(fresh), 6) == reference


# (h) bytes that are not UTF-8, and tiny datasets' epochs ----------------------------


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def data_log():
    """The data modules' log records, caught on their own logger: the project's logger does not
    propagate to the root (where caplog listens) once a run in this process has set it up."""
    log, handler = logging.getLogger("torchtitan.datasets"), _Records()
    log.addHandler(handler)
    previous = log.level
    log.setLevel(logging.INFO)  # setLevel, not .level =: it clears the loggers' cached levels
    yield handler.records
    log.removeHandler(handler)
    log.setLevel(previous)


LATIN1 = "café, déjà vu, naïve façade\n" * 5  # 5 characters outside ASCII per line: 25 bytes in Latin-1


def test_latin1_text_is_counted_in_one_warning_or_refused(tmp_path, data_log):
    path = tmp_path / "latin.txt"
    path.write_bytes(LATIN1.encode("latin-1"))
    documents = take(iter(build_source(Data(datasets=[str(path)]))), 3)  # three epochs of one document
    assert documents[0] == LATIN1.encode("latin-1").decode("utf-8", errors="replace")
    assert documents[0].count("\ufffd") == 25
    warnings = [r.getMessage() for r in data_log if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"{path} has 25 bytes not UTF-8 (replaced with U+FFFD" in warnings[0]
    assert 'data.decode_errors = "strict"' in warnings[0]
    with pytest.raises(ValueError) as error:
        next(iter(build_source(Data(datasets=[str(path)], decode_errors="strict"))))
    message = str(error.value)
    assert "\n" not in message and "latin.txt is not UTF-8 (byte 0xe9 at offset 3)" in message


def test_a_folder_of_bad_files_gets_one_total_per_epoch(tmp_path, data_log):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_bytes(LATIN1.encode("latin-1"))
    (tmp_path / "c.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "gar\xe7on"}\n')
    (tmp_path / "d.txt").write_text("all UTF-8: café\n")
    source = build_source(Data(datasets=[str(tmp_path)], val_fraction=0.0))
    documents = take(iter(source), 10)  # two epochs of 5 documents
    assert documents[3] == "gar\ufffdon" and documents[4] == "all UTF-8: café\n"
    warnings = [r.getMessage() for r in data_log if r.levelname == "WARNING"]
    assert len(warnings) == 2, warnings  # the first file when read, the epoch's total once
    assert "a.txt has 25 bytes" in warnings[0]
    assert "3 files / 51 bytes not UTF-8 in epoch 0" in warnings[1]
    with pytest.raises(ValueError, match=r"c.jsonl line 2 is not UTF-8 \(byte 0xe7 at offset 13\)"):
        take(iter(FileListSource([tmp_path / "c.jsonl"], decoder=sources.Decoder("c", "strict"))), 2)


def test_a_tiny_dataset_logs_its_rollover_once(tmp_path, data_log):
    tiny = write_jsonl(tmp_path / "tiny.jsonl", ["a short document of forty bytes or so..."] * 2)
    take(loader(Data(datasets=[str(tiny)])), 3)  # 3 x 4 windows of 65 tokens: about 6 epochs per batch
    epochs = [r.getMessage() for r in data_log if "epoch" in r.getMessage()]
    assert epochs == [f"dataset {str(tiny)!r}: epoch 0 done after 2 documents, looping (logged once)"]

"""Document sources: infinite, exactly resumable streams of texts.

Every training source loops over its data forever (counting epochs) and is ``Stateful``:
``state_dict()`` taken after a document was yielded, loaded into a freshly built
source, continues at exactly the next document. Each source also records the
``origin`` (dataset name, epoch) of the last document it yielded, which the
packer uses to refuse a dataset smaller than one sequence.

Splits. ``split="train"`` and ``"validation"`` are disjoint for every source: the stdlib
holds out files by a hash of their path, hub datasets have their own validation split, and
local files and folders hold out each document whose text hashes below ``data.val_fraction``
(``stdlib_corpus.held_out``). The text, not (file, record index): the split survives renaming,
resharding and reordering the files, and duplicated documents land on the same side, so an
exact copy of a validation document is never trained on. Hashing costs far less than
tokenizing. A validation source reads its split once and then raises ``EndOfSplit`` (the packer
would turn a plain end of iteration into a RuntimeError); the loop catches it.

Local text that is not UTF-8 is replaced and counted, or refused (``data.decode_errors``, see
``decoding.py``); the first rollover of each source is logged once, not once per epoch.

Nothing here depends on the rank: every rank reads the same stream (see
``dataloader.py`` for why).
"""

import json
import logging
import random
import time
from pathlib import Path
from typing import Iterator

from torch.distributed.checkpoint.stateful import Stateful

from torchtitan.datasets.decoding import Decoder, RolloverLog
from torchtitan.datasets.hub_access import check_hub_reachable, open_error_message
from torchtitan.datasets.stdlib_corpus import held_out, stdlib_files

logger = logging.getLogger(__name__)

# Whole-file documents vs files of records (one document per record).
_WHOLE_FILE_SUFFIXES = (".txt", ".py")
_RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")

# name -> (hub repo, config, text field)
HF_ALIASES = {
    "c4": ("allenai/c4", "en", "text"),
    "fineweb_edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"),
}
SPLITS = ("train", "validation")
_ACCEPTED = (
    "'stdlib', " + ", ".join(repr(a) for a in HF_ALIASES)
    + ", 'hf:<repo>[:<config>][@<split>]', or an existing local file/folder of "
    + "/".join(LOCAL_SUFFIXES) + " files"
)


class EndOfSplit(Exception):
    """A validation source has given every document of its split once (not a StopIteration:
    inside the packer's generator that would become a RuntimeError)."""


def _record_text(record, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"{where}: no text field {text_field!r} (found {keys}); set data.text_field"
        )
    text = record[text_field]
    # Real corpora contain null texts; they become empty documents (bos + eos only).
    return "" if text is None else str(text)


def _json_records(path: Path, decoder: Decoder) -> Iterator[dict]:
    # Decoded here rather than by json.loads(bytes), which fails on the first non-UTF-8 byte with a
    # traceback: the decoder replaces and counts them, or refuses the file naming the line.
    with path.open("rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix == ".json" and head.startswith(b"["):  # one JSON array of records
        yield from json.loads(decoder.text(path.read_bytes(), str(path)))
        return
    with path.open("rb") as f:  # JSON lines (.jsonl, or a .json holding lines)
        for i, line in enumerate(f):
            if line.strip():
                yield json.loads(decoder.text(line, f"{path} line {i + 1}"))


def _parquet_texts(path: Path, text_field: str, start: int) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: no text field {text_field!r} (columns {pf.schema_arrow.names}); set data.text_field"
        )
    seen = 0
    for group in range(pf.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        if seen + rows <= start:  # skip whole row groups on resume without reading them
            seen += rows
            continue
        column = pf.read_row_group(group, columns=[text_field]).column(0).to_pylist()
        for text in column[max(start - seen, 0):]:
            yield "" if text is None else str(text)
        seen += rows


def read_texts(path: Path, text_field: str, start: int = 0, decoder: Decoder | None = None) -> Iterator[str]:
    """The documents of one local file, from record ``start`` on (parquet strings are UTF-8 by format)."""
    decoder = decoder or Decoder(str(path))
    if path.suffix in _WHOLE_FILE_SUFFIXES:
        if start == 0:
            yield decoder.text(path.read_bytes(), str(path))
    elif path.suffix == ".parquet":
        yield from _parquet_texts(path, text_field, start)
    elif path.suffix in (".jsonl", ".json"):
        for i, record in enumerate(_json_records(path, decoder)):
            if i >= start:  # resume re-parses the skipped lines: simple, and exact
                yield _record_text(record, text_field, f"{path} record {i}")
    else:
        accepted = _WHOLE_FILE_SUFFIXES + _RECORD_SUFFIXES
        raise ValueError(f"{path}: unsupported file type; use one of {accepted}")


class FileListSource(Stateful):
    """Documents from a fixed, ordered list of local files (the stdlib corpus, local folders).

    ``split``: "all" keeps every document; "train" / "validation" keep those that ``held_out``
    (by their text and ``val_fraction``) puts on that side. ``loop=False`` reads the files once,
    then raises ``EndOfSplit``.

    State: epoch, index of the current file, index of the next record in it (held-out records
    count too, so a resume skips exactly what the first pass skipped).
    """

    def __init__(self, files: list[Path], text_field: str = "text", name: str = "", split: str = "all",
                 val_fraction: float = 0.0, loop: bool = True, decoder: Decoder | None = None):
        assert split in ("all", *SPLITS), split
        self.files = [Path(f) for f in files]
        self.text_field = text_field
        self.name = name or (str(self.files[0]) if len(self.files) == 1 else f"{len(self.files)} files")
        self.split, self.val_fraction, self.loop = split, val_fraction, loop
        self.decoder = decoder or Decoder(self.name)
        self.rollover = RolloverLog(self.name)
        self.epoch, self.file_index, self.record_index = 0, 0, 0
        self.origin = (self.name, 0)

    def _in_split(self, text: str) -> bool:
        return self.split == "all" or held_out(text, self.val_fraction) == (self.split == "validation")

    def __iter__(self) -> Iterator[str]:
        while True:
            from_start = self.file_index == 0 and self.record_index == 0
            yielded = read = 0
            while self.file_index < len(self.files):
                path = self.files[self.file_index]
                for text in read_texts(path, self.text_field, self.record_index, self.decoder):
                    # Advance before yielding, so a state_dict taken now points past this document.
                    self.record_index += 1
                    read += 1
                    if not self._in_split(text):
                        continue
                    self.origin = (self.name, self.epoch)
                    yielded += 1
                    yield text
                self.decoder.file_done(path)
                self.file_index, self.record_index = self.file_index + 1, 0
            self.decoder.epoch_done(self.epoch)
            if from_start and yielded == 0:
                raise ValueError(self._no_documents(held_out=read > 0))
            if not self.loop:
                raise EndOfSplit(f"dataset {self.name!r}: every document was read once")
            self.rollover.epoch_done(self.epoch, yielded if from_start else None)
            self.epoch, self.file_index, self.record_index = self.epoch + 1, 0, 0

    def _no_documents(self, held_out: bool) -> str:
        if held_out:  # documents exist, all on the other side of the split
            return (
                f"dataset {self.name!r} has no documents in its {self.split} split ({len(self.files)} files; "
                f"data.val_fraction={self.val_fraction} of the documents, chosen by a hash of their text, are "
                f"held out for validation); raise data.val_fraction, add documents, or name the validation "
                f"data in validation.datasets"
            )
        return (
            f"dataset {self.name!r} has no documents ({len(self.files)} files, all empty or without "
            f"'{self.text_field}' records); add text (.jsonl: one JSON object per line with a "
            f"'{self.text_field}' field, set by data.text_field) or remove it from data.datasets"
        )

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "file_index": self.file_index, "record_index": self.record_index}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self.file_index = state_dict["file_index"]
        self.record_index = state_dict["record_index"]


def network_errors() -> tuple[type[BaseException], ...]:
    """What a broken connection raises: OSError covers ConnectionError, TimeoutError and requests'
    errors; huggingface_hub >= 1.0 speaks httpx, and fsspec's http streams aiohttp."""
    errors: list[type[BaseException]] = [OSError]
    for module, name in (("httpx", "TransportError"), ("aiohttp", "ClientError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _retry_args(data_cfg) -> dict:
    return {"retries": data_cfg.stream_retries, "retry_seconds": data_cfg.stream_retry_seconds}


class HFSource(Stateful):
    """A Hugging Face hub dataset, streamed (nothing is downloaded up front).

    Exact resume uses ``datasets.IterableDataset.state_dict()``; our epoch is passed to
    ``set_epoch`` so that a new epoch starts from the beginning while a loaded state
    applies to the epoch it was saved in. ``loop=False``: one pass, then ``EndOfSplit``.
    """

    def __init__(self, path: str, name: str | None = None, split: str = "train", text_field: str = "text",
                 loop: bool = True, retries: int = 5, retry_seconds: float = 2.0):
        import datasets  # lazy: importing datasets costs ~1 s and only hub sources need it

        self.path, self.config_name, self.split, self.text_field = path, name, split, text_field
        self.loop = loop
        self.retries, self.retry_seconds = retries, retry_seconds
        self.name = f"{path}:{name}" if name else path
        check_hub_reachable(self.name)  # offline: one line now, not ~25 s of the hub's retries first
        try:
            self.dataset = datasets.load_dataset(path, name=name, split=split, streaming=True)
        except Exception as e:  # noqa: BLE001  (hub, network, cache and naming errors all end here)
            if not isinstance(e, (*network_errors(), ValueError, datasets.exceptions.DatasetNotFoundError)):
                raise
            raise ValueError(open_error_message(self.name, split, f"{type(e).__name__}: {_first_line(e)}")) from None
        self.epoch = 0
        self.origin = (self.name, 0)
        self.rollover = RolloverLog(self.name)

    def __iter__(self) -> Iterator[str]:
        while True:
            self.dataset.set_epoch(self.epoch)
            yielded = 0
            for record in self._records():
                self.origin = (self.name, self.epoch)
                yielded += 1
                yield _record_text(record, self.text_field, f"dataset {self.name!r}")
            if yielded == 0 and self.epoch == 0:
                raise ValueError(f"dataset {self.name!r} (split {self.split!r}) has no documents")
            if not self.loop:
                raise EndOfSplit(f"dataset {self.name!r}: every document of its {self.split!r} split was read")
            self.rollover.epoch_done(self.epoch, None)  # a resumed hub stream's count would be partial
            self.epoch += 1

    def _records(self) -> Iterator[dict]:
        """This epoch's records from the current position. A stream that breaks (network) is reopened
        at the position of the last record it gave, ``retries`` times in a row with doubling waits,
        so no document is skipped or repeated; then a one-line error."""
        failures = 0
        # After the last record given out. Taken once, not again on a retry: a broken iteration has
        # advanced the dataset's live state past records it never delivered.
        position = self.dataset.state_dict()
        while True:
            try:
                # .iter() rather than iter(): inside a DataLoader worker, iter() would shard the
                # dataset across workers, but every worker must see the whole stream.
                for batch in self.dataset.iter(batch_size=1):
                    failures = 0
                    yield {key: values[0] for key, values in batch.items()}
                    position = self.dataset.state_dict()
                return
            except network_errors() as e:
                failures += 1
                if failures > self.retries:
                    raise ValueError(
                        f"hub dataset {self.name!r}: the stream broke {failures} times in a row "
                        f"({type(e).__name__}: {_first_line(e)}); check the network or the hub's status, "
                        "then resume from the last checkpoint (the data position is exact), or train on a "
                        "local copy"
                    ) from None
                wait = min(self.retry_seconds * 2 ** (failures - 1), 60.0)
                logger.warning(f"dataset {self.name!r}: stream broke ({type(e).__name__}: {_first_line(e)}); "
                               f"retry {failures}/{self.retries} in {wait:.0f}s at the same document")
                time.sleep(wait)
                self.dataset.load_state_dict(position)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "hf": self.dataset.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch = state_dict["epoch"]
        self.dataset.load_state_dict(state_dict["hf"])


class MixtureSource(Stateful):
    """Each next document comes from source i with probability weights[i] / sum(weights).

    The choice uses a private ``random.Random`` whose state is saved, so the sequence of
    choices resumes exactly and does not depend on any global seed.
    """

    def __init__(self, sources: list, weights: list[float], seed: int = 0):
        if len(sources) != len(weights):
            raise ValueError(f"{len(sources)} sources but {len(weights)} weights")
        self.sources, self.weights = sources, list(weights)
        self.rng = random.Random(seed)
        self.origin = sources[0].origin

    def __iter__(self) -> Iterator[str]:
        iterators = [iter(s) for s in self.sources]
        choices = range(len(self.sources))
        while True:
            i = self.rng.choices(choices, weights=self.weights)[0]
            text = next(iterators[i])
            self.origin = self.sources[i].origin
            yield text

    def state_dict(self) -> dict:
        version, internal, gauss_next = self.rng.getstate()
        return {
            "rng": [version, list(internal), gauss_next],  # plain lists: DCP pickles them
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        version, internal, gauss_next = state_dict["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))
        for source, state in zip(self.sources, state_dict["sources"], strict=True):
            source.load_state_dict(state)


def resolve_weights(data_cfg) -> list[float]:
    """The mixture weights, normalized to sum 1 (empty = equal)."""
    n = len(data_cfg.datasets)
    if n == 0:
        raise ValueError("data.datasets is empty; name at least one dataset, e.g. ['stdlib']")
    weights = list(data_cfg.weights) or [1.0] * n
    if len(weights) != n:
        raise ValueError(
            f"data.weights has {len(weights)} entries but data.datasets has {n} ({data_cfg.datasets}); "
            "give one weight per dataset, or none for equal weights"
        )
    if any(not w > 0 for w in weights):
        raise ValueError(f"data.weights must all be positive, got {weights}")
    total = sum(weights)
    return [w / total for w in weights]


def local_files(spec: str) -> list[Path]:
    """The files of a local dataset: the file itself, or a folder's data files, sorted."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise ValueError(f"dataset file {spec!r} has an unsupported type; accepted: {LOCAL_SUFFIXES}")
        return [path]
    if path.is_dir():
        # Sorted by the path relative to the folder so the order is the same on every machine.
        files = [p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file()]
        if not files:
            raise ValueError(
                f"dataset folder {spec!r} holds no {'/'.join(LOCAL_SUFFIXES)} files; put the corpus there "
                f"or point data.datasets at another folder or file"
            )
        return sorted(files, key=lambda p: p.relative_to(path).as_posix())
    raise ValueError(f"dataset {spec!r} is not a known name nor an existing path; accepted: {_ACCEPTED}")


def parse_hf_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``hf:<repo>[:<config>][@<split>]`` -> (repo, config or None, split or None)."""
    body, _, hub_split = spec[len("hf:"):].partition("@")
    repo, _, config = body.partition(":")
    if not repo:
        raise ValueError(f"dataset {spec!r} names no repository; write hf:<repo>[:<config>][@<split>]")
    return repo, config or None, hub_split or None


def _build_one(spec: str, data_cfg, split: str):
    loop = split == "train"  # validation reads its split once per evaluation
    if spec == "stdlib":
        return FileListSource(stdlib_files(split, data_cfg.val_fraction), data_cfg.text_field, "stdlib", loop=loop,
                              decoder=Decoder("stdlib", quiet=True))
    if spec in HF_ALIASES:
        repo, config, text_field = HF_ALIASES[spec]
        return HFSource(repo, config, split, text_field, loop=loop, **_retry_args(data_cfg))
    if spec.startswith("hf:"):
        repo, config, hub_split = parse_hf_spec(spec)
        return HFSource(repo, config, hub_split or split, data_cfg.text_field, loop=loop, **_retry_args(data_cfg))
    files = local_files(spec)  # raises for a missing path, naming what is accepted
    return FileListSource(files, data_cfg.text_field, spec, split, data_cfg.val_fraction, loop=loop,
                          decoder=Decoder(spec, data_cfg.decode_errors))


def build_source(data_cfg, split: str = "train"):
    """The document source for ``data_cfg.datasets`` (a mixture when there are several)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use 'train' or 'validation'")
    if not 0.0 <= data_cfg.val_fraction <= 1.0:
        raise ValueError(
            f"data.val_fraction={data_cfg.val_fraction} is not a fraction; use a value in [0, 1), e.g. 0.01"
        )
    weights = resolve_weights(data_cfg)
    sources = [_build_one(spec, data_cfg, split) for spec in data_cfg.datasets]
    if len(sources) == 1:
        return sources[0]
    return MixtureSource(sources, weights, data_cfg.seed)

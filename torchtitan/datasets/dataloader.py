"""The training data loader: one global stream, sliced per data-parallel rank.

Every rank builds the same pipeline and reads whole GLOBAL batches of
``global_batch_size`` sequences; data-parallel rank ``r`` of ``dp`` keeps rows
``[r * G/dp, (r+1) * G/dp)``. Trade-off: each rank tokenizes ``dp`` times more
text than it trains on, which is cheap next to a training step, and buys two things:

* the data order does not depend on the parallel layout (dp=2 and dp=1 train on
  the same sequences, in the same order, step for step);
* the loader state is the same on every rank, so the trainer saves it once, and a
  checkpoint taken at dp=2 resumes at dp=1 or dp=4.

The state is refused on load when a field that defines the stream differs (the
fingerprint), rather than silently training on a different stream.
"""

import warnings

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan.datasets.packing import PackedDataset
from torchtitan.datasets.sources import HF_ALIASES, build_source, resolve_weights

# torchdata 0.11 calls an API torch 2.13 deprecated; nothing for a user to act on.
warnings.filterwarnings("ignore", message=".*set_vital.*")

STATE_VERSION = 1
_PREFETCH_FACTOR = 2  # global batches each worker prepares ahead


class DistributedDataLoader(Stateful):
    """Iterates this rank's rows of each global batch: {"tokens", "positions"}, each a LongTensor
    [G // dp, seq_len + 1] (positions: of each token inside its document, see packing.py).

    State: {"loader": StatefulDataLoader state, "fingerprint": {...}, "version": 1},
    identical on every rank.
    """

    def __init__(self, loader: StatefulDataLoader, fingerprint: dict, dp_rank: int, dp_degree: int):
        self.loader = loader
        self.fingerprint = fingerprint
        rows = fingerprint["global_batch_size"] // dp_degree
        self.rows = slice(dp_rank * rows, (dp_rank + 1) * rows)
        self._iterator = None  # created lazily, and again after a load_state_dict

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        batch = next(self._iterator)  # G x (seq_len + 1) each, the same on every rank
        return {key: rows_GL[self.rows] for key, rows_GL in batch.items()}

    def state_dict(self) -> dict:
        # With num_workers=0 this is the dataset's state right after the last batch
        # (nothing is prefetched); with workers, StatefulDataLoader keeps per-batch
        # snapshots of each worker's state and which worker is next.
        return {
            "loader": self.loader.state_dict(),
            "fingerprint": dict(self.fingerprint),
            "version": STATE_VERSION,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(
                f"data loader state has version {version}, this code reads version {STATE_VERSION}; "
                "start the data loader from scratch or use the code that wrote the checkpoint"
            )
        check_fingerprint(state_dict["fingerprint"], self.fingerprint)
        self.loader.load_state_dict(state_dict["loader"])
        self._iterator = None  # the next iter() starts from the loaded state


def check_fingerprint(saved: dict, current: dict) -> None:
    """Raise a ValueError naming every stream-defining field that differs."""
    diffs = [
        f"{key}: saved {saved.get(key)!r}, current {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    if diffs:
        raise ValueError(
            # One line: callers (checkpoint loading) report the first line of an error.
            "the data loader checkpoint was saved for a different data stream: "
            + "; ".join(diffs)
            + ". Fix: resume with the saved values of these fields, or start a new run "
            "(fresh dump folder) so that the data starts from the beginning"
        )


def _is_local(spec: str) -> bool:
    return spec != "stdlib" and spec not in HF_ALIASES and not spec.startswith("hf:")


def stream_fingerprint(data_cfg, tokenizer, seq_len: int, global_batch_size: int, split: str) -> dict:
    """The fields that define the stream of global batches (and the loader state's layout)."""
    return {
        "seq_len": seq_len,
        "global_batch_size": global_batch_size,
        "datasets": list(data_cfg.datasets),
        "weights": resolve_weights(data_cfg),  # normalized: [] and [1, 1] are the same stream
        "seed": data_cfg.seed,
        "shuffle_windows": data_cfg.shuffle_windows,
        "text_field": data_cfg.text_field,
        "val_fraction": data_cfg.val_fraction,
        "tokenizer_n_words": tokenizer.n_words,
        "split": split,
        # Not part of the stream, but the saved loader state holds one snapshot per worker.
        "num_workers": data_cfg.num_workers,
        # Local data holds out a validation split since this key exists: older checkpoints of local
        # data read every document, so they are refused (naming this key) rather than resumed off by 1%.
        **({"local_holdout": "sha256-of-text"} if any(_is_local(d) for d in data_cfg.datasets) else {}),
        # Only when set: checkpoints from before the key existed resume unchanged.
        **({"max_document_tokens": data_cfg.max_document_tokens} if data_cfg.max_document_tokens else {}),
    }


def build_dataloader(
    data_cfg,
    tokenizer,
    seq_len: int,
    global_batch_size: int,
    dp_rank: int,
    dp_degree: int,
    split: str = "train",
    device_type: str = "cpu",
) -> DistributedDataLoader:
    """The loader of this data-parallel rank's rows of every global batch."""
    if dp_degree < 1 or not 0 <= dp_rank < dp_degree:
        raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_degree={dp_degree})")
    if global_batch_size % dp_degree != 0:
        raise ValueError(
            f"training.global_batch_size ({global_batch_size}) must be divisible by the "
            f"data-parallel degree ({dp_degree})"
        )
    dataset = PackedDataset(
        build_source(data_cfg, split), tokenizer, seq_len, global_batch_size,
        shuffle_windows=data_cfg.shuffle_windows, seed=data_cfg.seed,
        max_document_tokens=data_cfg.max_document_tokens,
    )
    workers = data_cfg.num_workers
    loader = StatefulDataLoader(
        dataset,
        batch_size=global_batch_size,
        num_workers=workers,
        pin_memory=data_cfg.pin_memory and device_type == "cuda",
        prefetch_factor=_PREFETCH_FACTOR if workers > 0 else None,
    )
    fingerprint = stream_fingerprint(data_cfg, tokenizer, seq_len, global_batch_size, split)
    return DistributedDataLoader(loader, fingerprint, dp_rank, dp_degree)

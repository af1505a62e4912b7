"""Online tokenization and packing of documents into fixed-length windows.

Documents are tokenized as ``bos + doc + eos`` and appended to one token buffer;
the buffer is cut into consecutive, non-overlapping windows of ``seq_len + 1``
tokens (the trainer uses ``x[:-1]`` as input and ``x[1:]`` as labels), so no
token is padding and documents may span windows.

With ``shuffle_windows = K > 0`` each window goes through a pool of K windows from
which a seeded RNG draws the next one, so a batch mixes many documents instead of
consecutive pieces of one (the pool and the RNG are part of the state).

The stream of windows is the same on every rank and for every number of
DataLoader workers: worker ``w`` of ``W`` keeps the windows of global batches
``b`` with ``b % W == w`` and skips the others, and StatefulDataLoader takes
batches from workers round-robin, which restores the global order.
"""

import random

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info


def _worker_slot() -> tuple[int, int]:
    """(worker id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _EpochTokenCounter:
    """Counts the tokens each dataset gives per epoch, to refuse one smaller than a window.

    Such a dataset would not loop forever (the buffer carries tokens across epochs), but
    every window would repeat the same few documents: almost surely a mistake (a wrong
    text_field, a truncated file). Only epochs seen from their start are judged: all of
    them on a fresh start, from the next epoch on after a resume.
    """

    def __init__(self, window: int, fresh: bool):
        self.window = window
        self.fresh = fresh  # every source is at the start of its first epoch
        self._current: dict[str, tuple[int, int, bool]] = {}  # name -> (epoch, tokens, complete)

    def add(self, origin: tuple[str, int], n_tokens: int) -> None:
        name, epoch = origin
        seen_epoch, tokens, complete = self._current.get(name, (epoch, 0, self.fresh))
        if epoch == seen_epoch:
            self._current[name] = (epoch, tokens + n_tokens, complete)
            return
        if complete and tokens < self.window:
            raise ValueError(
                f"dataset {name!r} has {tokens} tokens per epoch, fewer than one sequence of "
                f"seq_len+1 = {self.window}; lower training.seq_len or add data"
            )
        self._current[name] = (epoch, n_tokens, True)


class PackedDataset(IterableDataset, Stateful):
    """Windows of ``seq_len + 1`` token ids (int64) packed from a document source.

    State: the source's state, the leftover token buffer and the number of windows
    cut so far; loading it continues at exactly the next window.
    """

    def __init__(self, source, tokenizer, seq_len: int, global_batch_size: int = 1,
                 shuffle_windows: int = 0, seed: int = 0):
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and global_batch_size ({global_batch_size}) must be >= 1")
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        # Tokens read but not yet cut into a window; shorter than a window between
        # documents, but one long document can leave many windows' worth here.
        self._buffer: list[int] = []
        self._windows_cut = 0  # windows cut from the global stream, kept or skipped
        self.shuffle_windows = shuffle_windows
        self._pool: list[list[int]] = []
        self._rng = random.Random(seed)

    def _fill(self, documents, counter: _EpochTokenCounter, window: int) -> None:
        while len(self._buffer) < window:
            tokens = self.tokenizer.encode(next(documents), bos=True, eos=True)
            counter.add(self.source.origin, len(tokens))
            self._buffer.extend(tokens)

    def __iter__(self):
        worker_id, num_workers = _worker_slot()
        window = self.seq_len + 1
        counter = _EpochTokenCounter(window, fresh=self._windows_cut == 0 and not self._buffer)
        documents = iter(self.source)
        while True:
            # Every worker tokenizes the whole stream, because where windows fall depends on
            # every document's length. Workers thus overlap tokenization with training but
            # do not divide it; tokenization is cheap next to a training step.
            ids = self._next_window(documents, counter, window)
            batch_index = self._windows_cut // self.global_batch_size
            self._windows_cut += 1  # state is updated before yielding: exact resume
            if batch_index % num_workers == worker_id:
                yield torch.tensor(ids, dtype=torch.long)

    def _next_window(self, documents, counter: _EpochTokenCounter, window: int) -> list[int]:
        while True:
            self._fill(documents, counter, window)
            ids = self._buffer[:window]
            del self._buffer[:window]
            if not self.shuffle_windows:
                return ids
            self._pool.append(ids)
            if len(self._pool) >= self.shuffle_windows:
                # Swap-remove a random entry: O(1), and the draw depends only on the RNG state.
                i = self._rng.randrange(len(self._pool))
                self._pool[i], self._pool[-1] = self._pool[-1], self._pool[i]
                return self._pool.pop()

    def state_dict(self) -> dict:
        return {
            "source": self.source.state_dict(),
            "buffer": list(self._buffer),  # a list, not a tensor: its length varies
            "windows_cut": self._windows_cut,
            "pool": [list(w) for w in self._pool],
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.source.load_state_dict(state_dict["source"])
        self._buffer = list(state_dict["buffer"])
        self._windows_cut = state_dict["windows_cut"]
        self._pool = [list(w) for w in state_dict["pool"]]
        version, internal, gauss = state_dict["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

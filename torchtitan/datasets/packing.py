"""Online tokenization and packing of documents into fixed-length windows.

Documents are tokenized as ``bos + doc + eos`` and appended to one token buffer;
the buffer is cut into consecutive, non-overlapping windows of ``seq_len + 1``
tokens (the trainer uses ``x[:-1]`` as input and ``x[1:]`` as labels), so no
token is padding and documents may span windows.

Each window also carries every token's position inside its document (the boundaries the
block-causal mask and document RoPE positions need): 0 at a document's first token, and at
the window's first token (the part of a document cut off by the previous window is gone).
With ``max_document_tokens = M > 0`` positions restart every M tokens: a long document is
several documents of M tokens (flame's ``context_len``).

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


def window_positions(doc_positions: list[int]) -> torch.Tensor:
    """In-document positions of one window, restarted at the window's first token."""
    positions = torch.tensor(doc_positions, dtype=torch.long)
    starts = (positions == 0).nonzero()
    head = int(starts[0]) if len(starts) else len(positions)  # the tail of a document cut earlier
    positions[:head] -= positions[0].clone()
    return positions


class PackedDataset(IterableDataset, Stateful):
    """Windows {"tokens", "positions"} of ``seq_len + 1`` int64 each, packed from a document source.

    State: the source's state, the leftover token buffer (and its positions) and the number of
    windows cut so far; loading it continues at exactly the next window.
    """

    def __init__(self, source, tokenizer, seq_len: int, global_batch_size: int = 1,
                 shuffle_windows: int = 0, seed: int = 0, max_document_tokens: int = 0):
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and global_batch_size ({global_batch_size}) must be >= 1")
        if max_document_tokens < 0:
            raise ValueError(f"data.max_document_tokens={max_document_tokens} must be >= 0 (0 = no split)")
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        # Tokens read but not yet cut into a window; shorter than a window between
        # documents, but one long document can leave many windows' worth here.
        self._buffer: list[int] = []
        self._positions: list[int] = []  # in-document position of each buffered token
        self.max_document_tokens = max_document_tokens
        self._windows_cut = 0  # windows cut from the global stream, kept or skipped
        self.shuffle_windows = shuffle_windows
        self._pool: list[tuple[list[int], list[int]]] = []  # (tokens, positions) windows
        self._rng = random.Random(seed)

    def _fill(self, documents, counter: _EpochTokenCounter, window: int) -> None:
        while len(self._buffer) < window:
            tokens = self.tokenizer.encode(next(documents), bos=True, eos=True)
            counter.add(self.source.origin, len(tokens))
            self._buffer.extend(tokens)
            piece = self.max_document_tokens or len(tokens)
            self._positions.extend(i % piece for i in range(len(tokens)))

    def __iter__(self):
        worker_id, num_workers = _worker_slot()
        window = self.seq_len + 1
        counter = _EpochTokenCounter(window, fresh=self._windows_cut == 0 and not self._buffer)
        documents = iter(self.source)
        while True:
            # Every worker tokenizes the whole stream, because where windows fall depends on
            # every document's length. Workers thus overlap tokenization with training but
            # do not divide it; tokenization is cheap next to a training step.
            ids, positions = self._next_window(documents, counter, window)
            batch_index = self._windows_cut // self.global_batch_size
            self._windows_cut += 1  # state is updated before yielding: exact resume
            if batch_index % num_workers == worker_id:
                yield {"tokens": torch.tensor(ids, dtype=torch.long), "positions": window_positions(positions)}

    def _next_window(self, documents, counter: _EpochTokenCounter, window: int) -> tuple[list[int], list[int]]:
        while True:
            self._fill(documents, counter, window)
            cut = self._buffer[:window], self._positions[:window]
            del self._buffer[:window], self._positions[:window]
            if not self.shuffle_windows:
                return cut
            self._pool.append(cut)
            if len(self._pool) >= self.shuffle_windows:
                # Swap-remove a random entry: O(1), and the draw depends only on the RNG state.
                i = self._rng.randrange(len(self._pool))
                self._pool[i], self._pool[-1] = self._pool[-1], self._pool[i]
                return self._pool.pop()

    def state_dict(self) -> dict:
        return {
            "source": self.source.state_dict(),
            "buffer": list(self._buffer),  # a list, not a tensor: its length varies
            "positions": list(self._positions),
            "windows_cut": self._windows_cut,
            "pool": [list(ids) for ids, _ in self._pool],
            "pool_positions": [list(pos) for _, pos in self._pool],
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.source.load_state_dict(state_dict["source"])
        self._buffer = list(state_dict["buffer"])
        self._windows_cut = state_dict["windows_cut"]
        pool = [list(w) for w in state_dict["pool"]]
        if "positions" in state_dict:
            self._positions = list(state_dict["positions"])
            self._pool = list(zip(pool, [list(p) for p in state_dict["pool_positions"]]))
        else:  # saved before positions existed: documents start at bos (max_document_tokens was 0)
            self._positions = self._positions_from_bos(self._buffer)
            self._pool = [(ids, self._positions_from_bos(ids)) for ids in pool]
        version, internal, gauss = state_dict["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    def _positions_from_bos(self, ids: list[int]) -> list[int]:
        positions, p = [], 0
        for token in ids:
            p = 0 if token == self.tokenizer.bos_id else p + 1
            positions.append(p)
        return positions

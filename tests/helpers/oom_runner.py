"""Runs train.py's main with an injected out-of-memory error, as a GPU too small for the local batch.

    python tests/helpers/oom_runner.py --oom-above ROWS [--at loss|end] [--rank RANK] [--skip N] -- <train.py args>

--oom-above: a forward/backward whose microbatches hold more than ROWS rows raises
torch.OutOfMemoryError (a smaller local batch runs through).
--at loss (default): at the loss of each such microbatch, after the model's forward (its activations
and autograd graph exist) and before the backward, on every rank: the usual OOM, equal shapes
failing at the same point everywhere.
--at end: after the whole forward/backward, its collectives done (FSDP's reduce-scatter included),
so that one rank can fail alone without leaving its peers in a collective.
--rank: only this global rank fails (default: every rank).
--skip: (--at loss) the first N such microbatches run through: the OOM comes after their backward, with
their gradients accumulated (FSDP holds them unsharded until the last microbatch).
Each injected error prints "injected OOM: ..." to stderr.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _oom(what: str) -> None:
    import torch

    print(f"injected OOM: rank {os.environ.get('RANK', '0')} {what}", file=sys.stderr, flush=True)
    raise torch.OutOfMemoryError(f"injected: {what}")


def arm(rows: int, at: str, rank: int | None, skip: int = 0) -> None:
    from torchtitan.components.train_step import ForwardBackward

    here = rank is None or int(os.environ.get("RANK", "0")) == rank
    if not here:
        return
    if at == "loss":
        original_loss = ForwardBackward.loss_fn
        seen = [0]

        def loss_fn(self, logits_BTV, labels_BT):
            if logits_BTV.requires_grad and logits_BTV.shape[0] > rows:  # a training microbatch, not evaluation
                seen[0] += 1
                if seen[0] > skip:
                    _oom(f"loss of a microbatch of {logits_BTV.shape[0]} rows")
            return original_loss(self, logits_BTV, labels_BT)

        ForwardBackward.loss_fn = loss_fn
    else:
        original_call = ForwardBackward.__call__

        def call(self, batch):
            loss = original_call(self, batch)
            if self.local_bs > rows:
                _oom(f"after the forward/backward at local batch {self.local_bs}")
            return loss

        ForwardBackward.__call__ = call


if __name__ == "__main__":
    if "--" not in sys.argv:
        sys.exit("usage: oom_runner.py --oom-above ROWS [--at loss|end] [--rank RANK] [--skip N] -- <train.py args>")
    split = sys.argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--oom-above", type=int, required=True)
    parser.add_argument("--at", choices=("loss", "end"), default="loss")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--skip", type=int, default=0)
    opts = parser.parse_args(sys.argv[1:split])
    arm(opts.oom_above, opts.at, opts.rank, opts.skip)
    from train import main

    main(sys.argv[split + 1:])

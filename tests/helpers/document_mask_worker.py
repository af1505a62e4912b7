"""Run under torchrun by tests/e2e/test_document_mask.py: a packed row [docA, docB, docC] through the
model built for a layout (CP, TP, ...) with block_causal + document positions, compared with each
document run alone on one device. Rank 0 prints the worst |difference| as `MAXDIFF <x>`.

Usage: torchrun --nproc_per_node N tests/helpers/document_mask_worker.py <train.py overrides...>
"""

import sys

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.tensor import DTensor

from torchtitan.components.float8 import Float8Training
from torchtitan.components.model_builder import ModelBuilder
from torchtitan.components.train_step import ForwardBackward
from torchtitan.config.manager import ConfigManager
from torchtitan.parallelisms.context_parallel import unshard_sequence
from torchtitan.parallelisms.init import init_model_weights
from torchtitan.parallelisms.utils import init_distributed
from torchtitan.trainer import build_context_parallel, build_parallel_dims

VOCAB = 256
DOC_LENGTHS = (20, 28, 16)  # sums to seq_len 64


def main(argv: list[str]) -> None:
    cfg = ConfigManager().parse_args(argv)
    device = init_distributed(cfg.comm, cfg.job.dump_folder)
    dims = build_parallel_dims(cfg.parallelism, device.type)
    cp = build_context_parallel(cfg, dims, device.type)
    step_fn = ForwardBackward(cfg.training, dims, device, cp, 1, 1, cfg.parallelism.loss_parallel,
                              attention_mask="block_causal", positions="document")
    builder = ModelBuilder(cfg, dims, device, cp, Float8Training(cfg.float8, device, dims.fsdp_enabled))
    built = builder.build(VOCAB, 1, step_fn.pipeline_loss)
    step_fn.attach(built)
    built.model.eval()

    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (1, n), generator=generator) for n in DOC_LENGTHS]
    tokens = torch.cat([*docs, torch.zeros(1, 1, dtype=torch.long)], dim=1)  # + the last label
    positions = torch.cat([torch.arange(n) for n in DOC_LENGTHS] + [torch.zeros(1, dtype=torch.long)])[None]
    inputs, _, kwargs, context = step_fn.model_inputs({"tokens": tokens, "positions": positions})
    with torch.no_grad(), context:
        logits = built.model(inputs, **kwargs)
    if isinstance(logits, DTensor):  # loss_parallel: vocab-sharded logits
        logits = logits.full_tensor()
    if cp is not None:  # this rank holds two chunks of the sequence: gather all, in global order
        gathered = funcol.all_gather_tensor(logits.contiguous(), gather_dim=1, group=dims.submesh("cp"))
        logits = unshard_sequence(gathered, cp.cp, seq_dim=1)

    reference = builder.spec.model_cls(built.args)  # one device, the same seeded init
    init_model_weights(reference, builder.spec.model_cls, built.args, cfg.training.seed, device)
    reference.eval()
    worst, start = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            alone = reference(doc)
            worst = max(worst, (logits[:, start:start + doc.shape[1]] - alone).abs().max().item())
            start += doc.shape[1]
    if torch.distributed.get_rank() == 0:
        print(f"MAXDIFF {worst}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])

"""Evaluate a checkpoint on lm-evaluation-harness tasks (multiple choice, perplexity, generation).

    python scripts/eval.py --checkpoint outputs/checkpoint --tasks hellaswag,arc_easy
        [--config outputs/config.toml] [--include_path DIR] [--limit N] [--batch_size B]
        [--num_fewshot K] [--output_path results.json] [--tokenizer PATH] [--dtype bfloat16] [--device cuda]
    torchrun --nproc_per_node 2 scripts/eval.py ... --tp 2       # a model too big for one device

``--checkpoint`` is anything ``torchtitan.inference.load_for_inference`` reads: a training run's
``<dump>/checkpoint`` (its newest complete step) or ``step-N``, a weights-only or converted DCP
folder, a Hugging Face folder, a Meta Llama folder. ``--config`` (the run's config.toml) is
only needed when the checkpoint does not carry one. The model runs as an lm-eval ``LM``
(torchtitan/inference/lm_eval_adapter.py) whose loglikelihoods equal lm-eval's own ``hf``
backend on our exported HF folder.

Tasks are lm-eval's own (their datasets come from the HF hub or its cache; ``HF_DATASETS_OFFLINE=1``
uses the cache only) or YAML files under ``--include_path`` (e.g. tests/data/lm_eval_task:
``dataset_path: json`` with local ``data_files``, paths relative to where you run). Prints the
harness's results table and writes the results as JSON to ``--output_path``. A bad input (unknown
task, missing checkpoint, ...) ends with one ``error:`` line and exit code 1; a task name is checked
first, in about a second, before torch, the task index and the model are loaded.
"""

import argparse
import difflib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# torch and the model loader are imported once the arguments and task names are known to be fine.
from torchtitan.tools.lm_eval_tasks import check_task_names  # noqa: E402
from torchtitan.tools.cli import main_with_user_errors  # noqa: E402

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # torchtitan.inference.loading.DTYPES, without importing torch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint, DCP export, HF or Meta folder")
    p.add_argument("--config", default="", help="the run's config.toml (default: the one the checkpoint carries)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    p.add_argument("--include_path", default="", help="folder of extra task YAMLs (searched before lm-eval's)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (< 1: a fraction); for quick checks")
    p.add_argument("--batch_size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--output_path", default="", help="JSON file to write the results to")
    p.add_argument("--tokenizer", default="", help="tokenizer file or folder (default: the config's / checkpoint's)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default="", help="e.g. cuda:0 or cpu (default: CUDA if available)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (run under torchrun with as many ranks)")
    p.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling and of sampled generation")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {a.batch_size}")
    if a.limit is not None and (a.limit <= 0 or (a.limit >= 1 and a.limit != int(a.limit))):
        raise ValueError(f"--limit must be a whole number of documents or a fraction in (0, 1), got {a.limit:g}")
    if a.output_path and Path(a.output_path).is_dir():  # found out now, not after the whole evaluation
        raise ValueError(f"--output_path {a.output_path!r} is a folder: pass the JSON file to write")
    a.tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not a.tasks:
        raise ValueError("--tasks is empty: pass one or more task names, e.g. --tasks hellaswag,arc_easy")
    return a


def _import_lm_eval() -> None:
    # lm-eval is heavy and only needed here: imported once the arguments are known to be fine.
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise ValueError(f"scripts/eval.py needs lm-evaluation-harness ({e}): pip install lm-eval") from None


def build_task_manager(tasks: list[str], include_path: str):
    """A TaskManager that knows every task in ``tasks``, or a ValueError naming the unknown one.

    Indexing lm-eval's ~15,000 built-in task YAMLs takes seconds: when --include_path holds every
    requested task, only it is indexed.
    """
    from lm_eval.tasks import TaskManager

    if include_path:  # a folder: check_task_names said so
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not _unknown(manager, tasks):
            return manager
    manager = TaskManager(include_path=include_path or None)
    unknown = _unknown(manager, tasks)
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks (yours: --include_path)"
        raise ValueError(f"unknown task {unknown[0]!r}: not in {where}.{hint} `lm-eval ls tasks` lists them")
    return manager


def _unknown(manager, tasks: list[str]) -> list[str]:
    known = set(manager.all_tasks)
    return [t for t in tasks if t not in known and not Path(t).is_file()]


def evaluate(a: argparse.Namespace) -> dict | None:
    """Load the model, run the harness; the results dict on the rank that reports (None on the others)."""
    import torch
    from lm_eval import simple_evaluate

    from torchtitan.inference.lm_eval_adapter import TorchTitanLM  # an lm-eval LM: imports lm-eval
    from torchtitan.inference.loading import DTYPES, find_checkpoint, load_for_inference

    find_checkpoint(a.checkpoint)  # a missing checkpoint fails before the task index is built
    manager = build_task_manager(a.tasks, a.include_path)
    im = load_for_inference(a.config or None, a.checkpoint, device=torch.device(a.device) if a.device else None,
                            tp=a.tp, dtype=DTYPES[a.dtype] if a.dtype else None, tokenizer=a.tokenizer or None)
    lm = TorchTitanLM.from_inference_model(im, batch_size=a.batch_size, seed=a.seed)
    limit = int(a.limit) if a.limit is not None and a.limit >= 1 else a.limit
    results = simple_evaluate(model=lm, tasks=a.tasks, task_manager=manager, num_fewshot=a.num_fewshot, limit=limit,
                              log_samples=False, random_seed=a.seed, numpy_random_seed=a.seed,
                              torch_random_seed=a.seed, fewshot_random_seed=a.seed)
    if results is not None:  # say what was evaluated (lm-eval records a pre-built LM as "TorchTitanLM")
        model_args = {"checkpoint": im.source, "config": a.config, "max_seq_len": im.max_seq_len}
        results["config"].update(model="torchtitan", model_args=model_args, batch_size=a.batch_size,
                                 device=str(im.device))
    return results


def report(results: dict, output_path: str) -> None:
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if output_path:
        path = Path(output_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n")
        print(f"wrote {path}")


def run(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    _import_lm_eval()
    check_task_names(a.tasks, a.include_path)  # a typo fails here, in about a second
    results = evaluate(a)
    if results is not None:
        report(results, a.output_path)


def main(argv: list[str] | None = None) -> None:
    main_with_user_errors(run, argv)  # a user error: one error: line, exit code 1


if __name__ == "__main__":
    main(sys.argv[1:])

"""Downstream evaluation with lm-evaluation-harness: our ``LM`` against lm-eval's own ``hf`` backend.

A tiny Llama 3 and a tiny Qwen3 are trained for 20 steps (loss ~8.3 -> ~5) with the end-of-training
Hugging Face export (weights + tokenizer.json). The same requests go through
``TorchTitanLM`` (our model, loaded from the DCP training checkpoint) and ``HFLM(pretrained=<export>)``
(transformers on the export, lm-eval's tokenization): per-request loglikelihoods, greedy flags,
rolling loglikelihoods, generations and task metrics must agree. Everything runs offline on the
local tasks of tests/data/lm_eval_task.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend needs it

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from tests.helpers.builders import script_module as _script  # noqa: E402
from torchtitan.inference.lm_eval_adapter import TorchTitanLM  # noqa: E402
from torchtitan.inference.loading import load_for_inference  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "data" / "lm_eval_task"
FAMILIES = ("llama3", "qwen3")
SEQ_LEN = 64
TOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _train_command(family: str, dump: Path, cache_dir: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "train.py"), "--model.name", family, "--model.flavor", "debugmodel_tiny",
        "--training.steps", "20", "--training.seq_len", str(SEQ_LEN), "--training.global_batch_size", "8",
        "--optimizer.lr", "1e-2", "--lr_scheduler.warmup_steps", "3", "--checkpoint.enable",
        "--job.dump_folder", str(dump), "--tokenizer.cache_dir", str(cache_dir), "--checkpoint.hf_export_folder", "hf",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir) -> dict[str, Path]:
    """family -> dump folder with checkpoint/step-20 and hf/ (both runs train at once, one core each)."""
    dumps = {family: tmp_path_factory.mktemp(f"run_{family}") for family in FAMILIES}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {f: subprocess.Popen(_train_command(f, d, cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                 text=True, env=env, cwd=REPO) for f, d in dumps.items()}
    for family, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{family}: {err[-4000:]}"
        assert (dumps[family] / "hf" / "tokenizer.json").is_file(), "the export should carry the tokenizer"
    return dumps


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No hub access, and the datasets cache of the local task in a temporary folder."""
    datasets_config = pytest.importorskip("datasets.config")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets_config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets"))
        mp.chdir(REPO)  # the task's data_files are relative to the repository root
        yield


@pytest.fixture(scope="module")
def models(runs):
    """family -> (ours: TorchTitanLM on the DCP checkpoint, reference: HFLM on the HF export)."""
    cache = {}

    def get(family: str) -> tuple[TorchTitanLM, HFLM]:
        if family not in cache:
            im = load_for_inference(None, runs[family] / "checkpoint")
            ours = TorchTitanLM.from_inference_model(im, batch_size=4, gen_chunk_tokens=4)
            # Batch 1 for the reference: our batching and padding must not change a number.
            cache[family] = ours, HFLM(pretrained=str(runs[family] / "hf"), batch_size=1, device="cpu")
        return cache[family]

    return get


@pytest.fixture(scope="module")
def harness(models):
    """family -> {"ours": results, "hf": results} of both local tasks, with per-request samples."""
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    cache = {}

    def get(family: str) -> dict:
        if family not in cache:
            cache[family] = {
                name: simple_evaluate(model=lm, tasks=["tiny_mc", "tiny_ppl"], task_manager=manager,
                                      bootstrap_iters=0, log_samples=True)
                for name, lm in zip(("ours", "hf"), models(family))
            }  # fmt: skip
        return cache[family]

    return get


def _instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _flat_responses(samples: list[dict]) -> list:
    """Every request's response in document order: (logprob, is_greedy) or a rolling logprob."""
    return [resp[0] for s in sorted(samples, key=lambda s: s["doc_id"]) for resp in s["resps"]]


# ----------------------------------------------------------------------------- parity with HFLM


@pytest.mark.parametrize("family", FAMILIES)
def test_task_loglikelihoods_and_metrics_match_hf_backend(harness, family):
    results = harness(family)
    for task in ("tiny_mc", "tiny_ppl"):
        ours, ref = (_flat_responses(results[name]["samples"][task]) for name in ("ours", "hf"))
        assert len(ours) == len(ref) == {"tiny_mc": 40, "tiny_ppl": 4}[task]  # 40 choices of 12 questions
        for got, want in zip(ours, ref):
            if task == "tiny_mc":
                assert got[1] == want[1]  # is_greedy
                got, want = got[0], want[0]
            assert abs(got - want) <= TOL, (task, got, want)
    metrics = {name: results[name]["results"] for name in ("ours", "hf")}
    assert metrics["ours"]["tiny_mc"]["acc,none"] == metrics["hf"]["tiny_mc"]["acc,none"]
    assert metrics["ours"]["tiny_mc"]["acc_norm,none"] == metrics["hf"]["tiny_mc"]["acc_norm,none"]
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert metrics["ours"]["tiny_ppl"][key] == pytest.approx(metrics["hf"]["tiny_ppl"][key], rel=1e-4)


def test_tokenization_edge_cases_match_hf_backend(models):
    """Requests the task does not make: empty context, trailing spaces, a context longer than
    max_seq_len (cut from the left), the bos text at the start of a context."""
    ours, ref = models("llama3")
    long_context = "def f(x):\n    return x + 1\n" * 12
    assert len(ours.tok_encode(long_context)) > SEQ_LEN + 10
    requests = _instances("loglikelihood", [
        ("", "import os"),
        ("def add(a, b):  ", "return a + b"),
        (long_context, " # done"),
        ("<|begin_of_text|>class Stack:", "\n    pass"),
    ])  # fmt: skip
    got, want = ours.loglikelihood(requests), ref.loglikelihood(requests)
    for (g, g_greedy), (w, w_greedy) in zip(got, want):
        assert abs(g - w) <= TOL and g_greedy == w_greedy, (got, want)


def test_greedy_flag_matches_hf_backend(models):
    """is_greedy on token requests: the model's own greedy continuation, then one token changed."""
    ours, ref = models("qwen3")
    context = ours.tok_encode("import os\nimport sys\n")
    greedy = ours.generate_fn([context], 6, temperature=0.0, top_k=0, top_p=1.0, seed=0)[0]
    assert len(greedy) == 6
    changed = greedy[:-1] + [(greedy[-1] + 1) % ours.tok.n_words]
    requests = [(None, context, greedy), (None, context, changed)]
    got, want = ours._loglikelihood_tokens(requests), ref._loglikelihood_tokens(requests)
    assert [flag for _, flag in got] == [flag for _, flag in want] == [True, False]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=TOL)
    assert got[1][0] < got[0][0]


def test_rolling_loglikelihood_over_several_windows_matches_hf_backend(models):
    ours, ref = models("qwen3")
    source = (REPO / "torchtitan" / "inference" / "lm_eval_adapter.py").read_text()[:2000]
    assert len(ours.tok_encode(source)) > 3 * SEQ_LEN  # several rolling windows
    requests = _instances("loglikelihood_rolling", [(source,), ("x = 1",)])
    got, want = ours.loglikelihood_rolling(requests), ref.loglikelihood_rolling(requests)
    assert got == pytest.approx(want, abs=TOL)


def test_generate_until_stops_at_the_stop_string_and_matches_hf_backend(models, monkeypatch):
    ours, ref = models("llama3")
    prompt = "class Stack:"
    greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0}
    free_ids = ours.generate_fn([ours.tok_encode(prompt)], 24, **greedy)[0]  # no stop string
    assert len(free_ids) == 24
    stop = ours.tok_decode(free_ids[9:10])  # the 10th token's text: it shows up by the 10th token
    first = next(k for k in range(1, 25) if stop in ours.tok_decode(free_ids[:k]))

    made = []
    generate_fn = ours.generate_fn

    def counting(prompts, n, **kwargs):
        out = generate_fn(prompts, n, **kwargs)
        made.extend(len(o) for o in out)
        return out

    monkeypatch.setattr(ours, "generate_fn", counting)
    stopped = ours.generate_until(_instances("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 24})]))
    assert stopped == [ours.tok_decode(free_ids).split(stop)[0]] and stop not in stopped[0]
    # Generated 4 tokens at a time (gen_chunk_tokens): it stopped after the chunk that made the stop string.
    assert sum(made) == -(-first // 4) * 4 < 24

    requests = _instances("generate_until", [
        (prompt, {"until": [stop], "max_gen_toks": 24}),
        ("def add(a, b):\n", {"until": ["\n\n"], "max_gen_toks": 12}),
        ("import os\n", {"until": ["import"], "max_gen_toks": 12}),
    ])  # fmt: skip
    assert ours.generate_until(requests) == ref.generate_until(requests)


# ----------------------------------------------------------------------------- the CLI


def test_cli_runs_the_local_task_offline_and_writes_json(runs, harness, tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"))
    cmd = [sys.executable, str(REPO / "scripts" / "eval.py"), "--checkpoint", str(runs["llama3"] / "checkpoint"),
           "--tasks", "tiny_mc", "--include_path", str(TASKS), "--limit", "8", "--batch_size", "4",
           "--output_path", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "|tiny_mc" in proc.stdout and "acc" in proc.stdout  # the harness's table
    results = json.loads(out.read_text())
    # The first 8 questions, scored in-process by lm-eval's hf backend on the export.
    samples = sorted(harness("llama3")["hf"]["samples"]["tiny_mc"], key=lambda s: s["doc_id"])[:8]
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(s["acc"] for s in samples) / 8)
    assert results["n-samples"]["tiny_mc"]["effective"] == 8
    assert "step-20" in results["config"]["model_args"]["checkpoint"]


@pytest.mark.parametrize("case, fragment", [
    ("unknown_task", "unknown task 'tiny_mcq'"),
    ("missing_checkpoint", "does not exist"),
    ("bad_include_path", "is not a folder"),
])  # fmt: skip
def test_cli_bad_input_is_one_error_line(runs, tmp_path, capsys, monkeypatch, case, fragment):
    monkeypatch.delenv("TORCHTITAN_TRACEBACK", raising=False)
    argv = {
        "unknown_task": ["--checkpoint", str(runs["llama3"] / "checkpoint"), "--tasks", "tiny_mcq",
                         "--include_path", str(TASKS)],
        "missing_checkpoint": ["--checkpoint", str(tmp_path / "nowhere"), "--tasks", "tiny_mc",
                               "--include_path", str(TASKS)],
        "bad_include_path": ["--checkpoint", str(runs["llama3"] / "checkpoint"), "--tasks", "tiny_mc",
                             "--include_path", str(tmp_path / "no_tasks")],
    }[case]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        _script("eval").main(argv)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    if case == "unknown_task":
        assert "Did you mean 'tiny_mc'?" in lines[0]

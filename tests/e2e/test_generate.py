"""Generation: the KV cache equals full recomputation, padding changes nothing, sampling is seeded,
TP2 equals one process, our HF export generates what transformers generates, checkpoints of every
kind and layout load, and bad input ends in one ``error:`` line (CPU, gloo, offline).

Models built in-process have wq/wk scaled up (as test_model.py): with near-uniform attention a
wrong cache slot or mask would barely move the logits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.runs import REPO, tiny_overrides
from torchtitan.components.weight_conversion import save_dcp
from torchtitan.inference import InferenceModel, find_checkpoint, generate, kv_cache, load_for_inference
from torchtitan.inference.generate import GenerationStats
from torchtitan.models.layers import CausalSDPA
from torchtitan.models.registry import get_spec
from torchtitan.parallelisms.utils import free_port

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

VOCAB, CONTEXT = 512, 64
FAMILIES = [("llama3", "debugmodel_tiny"), ("qwen3", "debugmodel_tiny"), ("qwen3", "debugmodel_moe_tiny")]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def _sharp_model(family: str, flavor: str, seed: int = 0) -> InferenceModel:
    spec = get_spec(family)
    args = spec.build_args(flavor, vocab_size=VOCAB, max_seq_len=CONTEXT)
    torch.manual_seed(seed)
    model = spec.model_cls(args).eval()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(4.0)
            layer.attention.wk.weight.mul_(4.0)
    return InferenceModel(model, None, args, spec, CONTEXT, torch.device("cpu"), "in-process")


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("family,flavor", FAMILIES, ids=["llama3", "qwen3", "qwen3_moe"])
def test_kv_cache_logits_equal_full_recomputation(family, flavor):
    """32 greedy decode steps of two right-padded rows of different lengths: the cached logits of
    each row equal the logits of the whole sequence recomputed without a cache."""
    im = _sharp_model(family, flavor)
    prompts = _prompts([5, 9])
    seqs = [list(p) for p in prompts]
    cached = []
    with torch.no_grad():
        with kv_cache(im.model, batch_size=2, max_len=9 + 32):
            tokens = torch.tensor([p + [0] * (9 - len(p)) for p in prompts])
            logits = im.model(tokens, positions=torch.arange(9).expand(2, 9))
            last = torch.stack([logits[b, len(p) - 1] for b, p in enumerate(prompts)])
            for _ in range(32):
                cached.append(last)
                nxt = last.argmax(-1)
                for b in range(2):
                    seqs[b].append(int(nxt[b]))
                positions = torch.tensor([[len(s) - 1] for s in seqs])
                last = im.model(nxt[:, None], positions=positions)[:, -1]
        worst = 0.0
        for step, logits_BV in enumerate(cached):
            for b, prompt in enumerate(prompts):
                n = len(prompt) + step  # tokens before this step's prediction
                full = im.model(torch.tensor([seqs[b][:n]]))[0, -1]
                worst = max(worst, (full - logits_BV[b]).abs().max().item())
    assert worst <= 1e-5, worst
    assert all(isinstance(layer.attention.sdpa, CausalSDPA) for layer in im.model.layers.values())  # restored


@pytest.mark.parametrize("family,flavor", [FAMILIES[0], FAMILIES[2]], ids=["llama3", "qwen3_moe"])
def test_batched_prompts_equal_each_alone(family, flavor):
    im = _sharp_model(family, flavor)
    prompts = _prompts([3, 11, 6])
    batched = generate(im, prompts, max_new_tokens=12, eos_id=-1)
    alone = [generate(im, [p], max_new_tokens=12, eos_id=-1)[0] for p in prompts]
    assert batched == alone
    assert all(len(row) == 12 for row in batched)
    assert generate(im, prompts, max_new_tokens=12, eos_id=-1, use_cache=False) == batched


def test_sampling_is_seeded_and_filters():
    im = _sharp_model(*FAMILIES[0])
    prompts = _prompts([4, 7])
    kw = dict(max_new_tokens=10, eos_id=-1)
    greedy = generate(im, prompts, **kw)
    a = generate(im, prompts, temperature=1.0, seed=3, **kw)
    assert a == generate(im, prompts, temperature=1.0, seed=3, **kw)
    assert a == generate(im, prompts, temperature=1.0, seed=3, use_cache=False, **kw)
    assert a != generate(im, prompts, temperature=1.0, seed=4, **kw)
    assert a != greedy
    # Filters that leave one candidate are greedy whatever the seed and temperature.
    assert generate(im, prompts, temperature=2.0, top_k=1, seed=5, **kw) == greedy
    assert generate(im, prompts, temperature=2.0, top_p=1e-6, seed=5, **kw) == greedy


def test_rows_stop_at_eos_and_at_the_context():
    im = _sharp_model(*FAMILIES[0])
    prompts = _prompts([4, 7])
    greedy = generate(im, prompts, max_new_tokens=8, eos_id=-1)
    eos = greedy[0][3]
    first = greedy[0].index(eos)
    stats = GenerationStats()
    out = generate(im, prompts, max_new_tokens=8, eos_id=eos, stats=stats)
    assert out[0] == greedy[0][:first]  # stopped before the eos, which is not returned
    cut = greedy[1].index(eos) if eos in greedy[1] else 8
    assert out[1] == greedy[1][:cut]
    assert stats.new_tokens == len(out[0]) + len(out[1]) and stats.prompt_tokens == 11
    long = _prompts([CONTEXT - 3])
    assert len(generate(im, long, max_new_tokens=10, eos_id=-1)[0]) == 3  # prompt + completion <= context


# ----------------------------------------------------------------------------- checkpoints


def _train(dump: Path, cache: Path, nproc: int = 1, layout: tuple[str, ...] = ()) -> Path:
    """4 steps of the tiny Llama: a full training checkpoint at step 2, a weights-only final save at
    step 4 and the end-of-training HF export."""
    args = tiny_overrides(dump, cache, steps=4) + [
        "--optimizer.lr", "3e-3", "--checkpoint.enable", "--checkpoint.interval", "2",
        "--checkpoint.model_weights_only", "--checkpoint.hf_export_folder", "hf", *layout,
    ]  # fmt: skip
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    proc = subprocess.run([*launcher, str(REPO / "train.py"), *args], capture_output=True, text=True, env=ENV,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dump


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    return _train(tmp_path_factory.mktemp("gen_run"), cache_dir)


def _cli_command(args: list[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
    ]  # fmt: skip
    return [*launcher, str(REPO / "scripts" / "generate.py"), *args]


def _cli(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(_cli_command(args, nproc), capture_output=True, text=True, env=ENV, timeout=300, cwd=REPO)


def _cli_ids(args: list[str], out: Path, nproc: int = 1) -> list[list[int]]:
    proc = _cli([*args, "--output_json", str(out)], nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "tokens/s" in proc.stdout
    return json.loads(out.read_text())["completion_ids"]


GREEDY = ["--prompt", "def main(", "--prompt", "import os\nimport sys\n", "--max_new_tokens", "12",
          "--temperature", "0"]


def test_every_checkpoint_kind_loads_the_same_weights(trained, tmp_path):
    """The checkpoint folder (-> newest step: weights-only), the HF export and a Meta folder of the
    same weights: equal state dicts; the full step-2 checkpoint: another step's weights."""
    folder = trained / "checkpoint"
    assert find_checkpoint(folder).path == folder / "step-4"
    newest = load_for_inference(None, folder)
    assert newest.source.endswith("step-4") and newest.tokenizer is not None and newest.max_seq_len == 64
    ref = newest.model.state_dict()
    hf = load_for_inference(str(trained / "config.toml"), trained / "hf")
    meta = tmp_path / "meta"
    meta.mkdir()
    torch.save({k: v.clone() for k, v in ref.items()}, meta / "consolidated.00.pth")
    a = newest.args
    params = {"dim": a.dim, "n_layers": a.n_layers, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads,
              "vocab_size": a.vocab_size, "multiple_of": a.multiple_of, "norm_eps": a.norm_eps,
              "rope_theta": a.rope_theta}  # fmt: skip
    (meta / "params.json").write_text(json.dumps(params))
    from_meta = load_for_inference(None, meta, max_seq_len=64)
    for other in (hf, from_meta):
        sd = other.model.state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    step2 = load_for_inference(None, folder / "step-2").model.state_dict()
    assert not torch.equal(step2["output.weight"], ref["output.weight"])


def _greedy_in_process(checkpoint: Path) -> list[list[int]]:
    """What ``generate.py ... GREEDY`` computes, in this process."""
    im = load_for_inference(None, checkpoint)
    texts = [GREEDY[i + 1] for i, a in enumerate(GREEDY) if a == "--prompt"]
    return generate(im, [im.tokenizer.encode(t, bos=True, eos=False) for t in texts], max_new_tokens=12)


def test_tp2_greedy_tokens_equal_one_process(trained, tmp_path):
    two = _cli_ids(["--checkpoint", str(trained / "checkpoint"), *GREEDY, "--tp", "2"], tmp_path / "two.json", 2)
    assert two == _greedy_in_process(trained / "checkpoint")
    assert all(len(row) > 0 for row in two)


def test_hf_export_greedy_tokens_equal_transformers(trained):
    transformers = pytest.importorskip("transformers")
    im = load_for_inference(str(trained / "config.toml"), trained / "hf")
    prompts = [im.tokenizer.encode(text, bos=True, eos=False) for text in ("def main(", "import os\nclass A:")]
    ours = generate(im, prompts, max_new_tokens=16)
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained / "hf", dtype=torch.float32).eval()
    eos = im.tokenizer.eos_id
    for prompt, got in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=16, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        new = out[0, len(prompt):].tolist()
        assert got == (new[: new.index(eos)] if eos in new else new)


def test_hf_export_alone_names_model_and_tokenizer(trained):
    """The HF export without --config: model from config.json, tokenizer from its tokenizer.json."""
    if not (trained / "hf" / "tokenizer.json").is_file():
        pytest.skip("this build's HF export writes no tokenizer.json")
    alone = load_for_inference(None, trained / "hf")
    with_config = load_for_inference(str(trained / "config.toml"), trained / "hf")
    text = "def main(args):\n    return 0\n"
    assert alone.tokenizer.encode(text, bos=True, eos=False) == with_config.tokenizer.encode(text, bos=True, eos=False)
    assert alone.tokenizer.eos_id == with_config.tokenizer.eos_id
    prompts = [with_config.tokenizer.encode("import os", bos=True, eos=False)]
    assert generate(alone, prompts, 12) == generate(with_config, prompts, 12)


def _layout_case(trained: Path, dump: Path, cache_dir: Path, layout: tuple[str, ...]):
    """The same training run on 2 ranks in ``layout``: its full (step-2) and weights-only (step-4)
    checkpoints load in one process with the greedy tokens of the one-process run's."""
    sharded = _train(dump, cache_dir, 2, layout)
    for step in ("step-2", "step-4"):
        ref = _greedy_in_process(trained / "checkpoint" / step)
        assert _greedy_in_process(sharded / "checkpoint" / step) == ref, step


def test_fsdp2_training_checkpoint_loads_with_the_same_tokens(trained, tmp_path, cache_dir):
    _layout_case(trained, tmp_path, cache_dir, ("--parallelism.dp_shard", "2"))


@pytest.mark.slow
def test_tp2_training_checkpoint_loads_with_the_same_tokens(trained, tmp_path, cache_dir):
    _layout_case(trained, tmp_path, cache_dir, ("--parallelism.dp_shard", "1", "--parallelism.tp", "2"))


# ----------------------------------------------------------------------------- bad input


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_bad_inputs_end_in_one_error_line(trained, tmp_path):
    ckpt = ["--checkpoint", str(trained / "checkpoint")]
    other = tmp_path / "other.toml"
    config = (trained / "config.toml").read_text()
    other.write_text(config.replace('flavor = "debugmodel_tiny"', 'flavor = "debugmodel"'))
    cases = {
        "too_long": [*ckpt, "--prompt", "x = 1\n" * 100],
        "missing": ["--checkpoint", str(tmp_path / "nowhere"), "--prompt", "a"],
        "shape": [*ckpt, "--config", str(other), "--prompt", "a"],
        "heads": [*ckpt, "--prompt", "a", "--tp", "3"],
    }
    # Started together: interpreter start-up dominates, and the four do not depend on each other.
    procs = {name: subprocess.Popen(_cli_command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=ENV, cwd=REPO) for name, args in cases.items()}
    errors = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        errors[name] = _one_error_line(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    assert "context is 64" in errors["too_long"] and "shorten the prompt" in errors["too_long"]
    assert "does not exist" in errors["missing"] and "Hugging Face folder" in errors["missing"]
    assert "does not match the model" in errors["shape"] and "tok_embeddings.weight" in errors["shape"]
    assert "--tp 3 must divide n_heads=4 and n_kv_heads=2" in errors["heads"]
    assert "pick --tp from 1, 2" in errors["heads"]


def test_checkpoint_folder_without_a_complete_save(tmp_path):
    (tmp_path / "checkpoint" / "step-4.tmp").mkdir(parents=True)
    (tmp_path / "checkpoint" / "step-2").mkdir()
    with pytest.raises(ValueError, match="holds only incomplete saves"):
        find_checkpoint(tmp_path / "checkpoint")



def test_converted_export_loads_without_config(tmp_path):
    """A converted DCP export (model_args.json, no config.toml): the family and shapes from the file,
    no tokenizer (nothing names one), the in-process model's tokens."""
    im = _sharp_model(*FAMILIES[2])
    save_dcp(im.model.state_dict(), im.args, tmp_path / "export")
    loaded = load_for_inference(None, tmp_path / "export")
    assert loaded.tokenizer is None and loaded.spec.name == "qwen3" and loaded.args == im.args
    prompts = _prompts([5, 2])
    assert generate(loaded, prompts, 8, eos_id=-1) == generate(im, prompts, 8, eos_id=-1)

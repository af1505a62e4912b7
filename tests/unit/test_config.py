"""Config parsing: precedence, CLI forms, type checks, error messages, help, dump round-trip."""

import dataclasses
from pathlib import Path

import pytest

from torchtitan.config.job_config import JobConfig
from torchtitan.config.manager import ConfigManager, config_to_dict, dump_config

TRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[2] / "train_configs").glob("*.toml"))


def parse(*argv):
    return ConfigManager().parse_args(list(argv))


@pytest.fixture
def toml_file(tmp_path):
    """Write a TOML text to a temp file and return its path as a string."""

    def write(text: str) -> str:
        path = tmp_path / "job.toml"
        path.write_text(text)
        return str(path)

    return write


# --- precedence and CLI forms ------------------------------------------------


def test_defaults_without_toml():
    assert config_to_dict(parse()) == config_to_dict(JobConfig())


def test_precedence_cli_over_toml_over_defaults(toml_file):
    path = toml_file("[training]\nsteps = 50\nseq_len = 128\n[optimizer]\nlr = 2e-4\n")
    cfg = parse("--job.config_file", path, "--training.steps", "7")
    assert cfg.training.steps == 7  # CLI beats TOML
    assert cfg.training.seq_len == 128  # TOML beats default
    assert cfg.optimizer.lr == 2e-4
    assert cfg.training.global_batch_size == JobConfig().training.global_batch_size  # default
    assert cfg.job.config_file == path


def test_config_alias(toml_file):
    path = toml_file("[training]\nsteps = 5\n")
    assert parse("--config", path).training.steps == 5
    assert parse(f"--config={path}").training.steps == 5


def test_space_and_equals_forms():
    cfg = parse("--training.steps", "12", "--optimizer.lr=3e-4", "--job.description=a=b", "--training.seed", "-3")
    assert (cfg.training.steps, cfg.optimizer.lr, cfg.job.description) == (12, 3e-4, "a=b")
    assert cfg.training.seed == -3  # a negative number is a value, not an option


def test_int_given_for_float(toml_file):
    assert parse("--optimizer.lr", "1").optimizer.lr == 1.0
    cfg = parse("--config", toml_file("[training]\nmax_norm = 2\n"))
    assert cfg.training.max_norm == 2.0 and isinstance(cfg.training.max_norm, float)


def test_boolean_flags():
    assert parse("--compile.enable").compile.enable is True
    assert parse("--data.no_pin_memory").data.pin_memory is False
    assert parse("--data.pin_memory=false").data.pin_memory is False
    assert parse("--data.pin_memory", "No").data.pin_memory is False
    assert parse("--compile.enable=YES", "--training.steps", "3").compile.enable is True
    assert parse("--compile.enable", "--training.steps", "3").compile.enable is True
    for text in ("true", "1", "yes", "TRUE"):
        assert parse(f"--job.print_config={text}").job.print_config is True
    for text in ("false", "0", "no", "False"):
        assert parse(f"--job.print_config={text}").job.print_config is False


def test_lists_cli_and_toml(toml_file):
    cfg = parse("--data.datasets", "c4,stdlib", "--data.weights", "0.7, 0.3")
    assert cfg.data.datasets == ["c4", "stdlib"] and cfg.data.weights == [0.7, 0.3]
    assert parse("--float8.filter_fqns=").float8.filter_fqns == []
    cfg = parse("--config", toml_file('[data]\ndatasets = ["c4", "x"]\nweights = [1, 0.5]\n'))
    assert cfg.data.datasets == ["c4", "x"] and cfg.data.weights == [1.0, 0.5]


def test_list_defaults_not_shared():
    a, b = parse(), parse()
    a.data.datasets.append("c4")
    assert b.data.datasets == ["stdlib"]


# --- errors --------------------------------------------------------------------


def test_unknown_key_cli_suggests():
    with pytest.raises(ValueError, match=r"training\.stpes.*command line.*did you mean 'training\.steps'\?"):
        parse("--training.stpes", "10")
    with pytest.raises(ValueError, match=r"did you mean 'optimizer\.lr'\?"):
        parse("--training.lr", "1e-3")  # right key, wrong section
    with pytest.raises(ValueError, match=r"did you mean 'training\.steps'\?"):
        parse("--steps", "10")


def test_unknown_key_toml_suggests(toml_file):
    path = toml_file("[training]\nstpes = 10\n")
    with pytest.raises(ValueError, match=r"training\.stpes") as err:
        parse("--config", path)
    assert path in str(err.value) and "did you mean 'training.steps'?" in str(err.value)


def test_unknown_section(toml_file):
    with pytest.raises(ValueError, match=r"unknown section 'trainig'.*did you mean 'training\.steps'\?"):
        parse("--trainig.steps", "3")
    path = toml_file("[optimiser]\nlr = 1.0\n")
    with pytest.raises(ValueError, match=r"unknown section \[optimiser\].*did you mean 'optimizer'\?") as err:
        parse("--config", path)
    assert path in str(err.value)
    with pytest.raises(ValueError, match=r"outside any \[section\].*did you mean 'training\.steps'\?"):
        parse("--config", toml_file("steps = 3\n"))


def test_wrong_type_cli():
    with pytest.raises(ValueError, match=r"training\.steps expects int, got 'ten' \(from the command line\)"):
        parse("--training.steps", "ten")
    with pytest.raises(ValueError, match=r"training\.steps expects int, got '1\.5'"):
        parse("--training.steps=1.5")
    with pytest.raises(ValueError, match=r"compile\.enable expects bool.*'maybe'"):
        parse("--compile.enable=maybe")
    with pytest.raises(ValueError, match=r"data\.weights expects list\[float\], got '0\.5,x'"):
        parse("--data.weights", "0.5,x")


def test_wrong_type_toml(toml_file):
    path = toml_file('[training]\nsteps = "ten"\n')
    with pytest.raises(ValueError, match=r"training\.steps expects int, got 'ten'") as err:
        parse("--config", path)
    assert path in str(err.value)
    with pytest.raises(ValueError, match=r"compile\.enable expects bool.*without quotes.*got 'true'"):
        parse("--config", toml_file('[compile]\nenable = "true"\n'))
    with pytest.raises(ValueError, match=r"training\.steps expects int, got True"):
        parse("--config", toml_file("[training]\nsteps = true\n"))
    with pytest.raises(ValueError, match=r"data\.datasets expects list\[str\], got 'c4'"):
        parse("--config", toml_file('[data]\ndatasets = "c4"\n'))


def test_missing_value_and_positional():
    with pytest.raises(ValueError, match=r"--training\.steps is missing its value"):
        parse("--training.steps")
    with pytest.raises(ValueError, match=r"--training\.steps is missing its value"):
        parse("--training.steps", "--optimizer.lr", "1")
    with pytest.raises(ValueError, match=r"unexpected argument 'config\.toml'.*--config PATH"):
        parse("config.toml")


def test_malformed_toml_names_line_and_column(toml_file):
    path = toml_file("[training]\nsteps = 10\nseq_len 128\n")
    with pytest.raises(ValueError, match=r"line 3, column \d+") as err:
        parse("--config", path)
    assert path in str(err.value) and "Fix the syntax" in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        parse("--config", str(tmp_path / "nope.toml"))


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--lr_scheduler.decay_type", "cos"], r"lr_scheduler\.decay_type must be one of 'linear', 'cosine', 'wsd', got 'cos'"),
        (["--activation_checkpoint.mode", "some"], r"activation_checkpoint\.mode must be one of 'none', 'full', 'selective'"),
        (["--optimizer.implementation", "fast"], r"optimizer\.implementation must be one of .*'for-loop'"),
        (["--training.mixed_precision_param", "fp16"], r"mixed_precision_param must be one of '', 'bfloat16'"),
        (["--float8.recipe_name", "blockwise"], r"float8\.recipe_name must be one of 'tensorwise', 'rowwise'"),
        (["--training.steps", "0"], r"training\.steps must be a positive integer, got 0 \(from the command line\)"),
        (["--training.seq_len", "-5"], r"training\.seq_len must be a positive integer"),
        (["--training.global_batch_size", "0"], r"global_batch_size must be a positive integer"),
        (["--metrics.log_freq", "0"], r"metrics\.log_freq must be a positive integer"),
        (["--training.local_batch_size", "-2"], r"local_batch_size must be a positive integer, -1 \(global/dp\) or 0"),
        (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "x"], r"'op' or a positive integer"),
        (["--data.datasets", "a,b", "--data.weights", "1"], r"data\.weights needs one weight per dataset"),
    ],
)
def test_semantic_validation(argv, pattern):
    with pytest.raises(ValueError, match=pattern):
        parse(*argv)


def test_validation_names_toml_origin(toml_file):
    path = toml_file('[lr_scheduler]\ndecay_type = "cos"\n')
    with pytest.raises(ValueError, match="decay_type") as err:
        parse("--config", path)
    assert path in str(err.value)


# --- help ------------------------------------------------------------------------


def test_help_lists_every_option(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as exit_info:
            parse("--training.steps", "3", flag)
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        for section in dataclasses.fields(JobConfig):
            assert f"[{section.name}]" in out
            for key in dataclasses.fields(section.type):
                assert f"--{section.name}.{key.name} " in out
        steps_line = next(line for line in out.splitlines() if "--training.steps " in line)
        assert "int" in steps_line and "default: 10000" in steps_line
        assert "Optimizer steps to train" in out
        assert 'default: ["stdlib"]' in out


# --- dump and train_configs ---------------------------------------------------


def test_dump_reparse_identity(tmp_path):
    cfg = parse(
        "--job.description", 'quote " backslash \\ tab\t newline\n é \x7f',
        "--data.datasets", "c4,stdlib", "--data.weights", "0.7,0.3", "--float8.filter_fqns=",
        "--optimizer.lr", "1e-8", "--compile.enable", "--training.max_seconds", "inf",
    )
    path = dump_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.toml"
    reparsed = parse("--config", str(path))
    # Only where the config was read from differs.
    expected = dataclasses.replace(cfg, job=dataclasses.replace(cfg.job, config_file=str(path)))
    assert config_to_dict(reparsed) == config_to_dict(expected)


def test_dump_defaults_identity(tmp_path):
    path = dump_config(JobConfig(), tmp_path)
    reparsed = parse("--config", str(path))
    reparsed.job.config_file = ""
    assert config_to_dict(reparsed) == config_to_dict(JobConfig())


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_configs_parse(path, tmp_path):
    cfg = parse("--config", str(path))
    assert cfg.job.config_file == str(path)
    # The shipped files round-trip through dump too.
    reparsed = parse("--config", str(dump_config(cfg, tmp_path)))
    assert config_to_dict(reparsed)["training"] == config_to_dict(cfg)["training"]


def test_train_configs_present():
    names = {p.name for p in TRAIN_CONFIGS}
    assert {"debug_model.toml", "llama3_8b.toml", "llama3_70b.toml", "llama3_405b.toml"} <= names


def test_debug_model_values():
    cfg = parse("--config", str(TRAIN_CONFIGS[0].parent / "debug_model.toml"))
    assert (cfg.model.flavor, cfg.data.datasets, cfg.tokenizer.path) == ("debugmodel", ["stdlib"], "")
    assert (cfg.training.steps, cfg.training.seq_len, cfg.training.seed) == (200, 256, 42)
    assert (cfg.lr_scheduler.decay_type, cfg.lr_scheduler.warmup_steps) == ("cosine", 20)


def test_readme_reference_lists_every_option():
    """The README's option table is generated; a new option must be documented there too."""
    import importlib.util

    repo = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("config_reference", repo / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.reference() in (repo / "README.md").read_text(), (
        "README.md's config reference is stale: run python scripts/config_reference.py --readme"
    )


def test_a_feature_whose_package_is_missing_is_refused_at_start(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    manager = ConfigManager()
    cfg = manager.parse_args(["--metrics.enable_wandb"])
    with pytest.raises(ValueError, match=r"^metrics.enable_wandb needs the package 'wandb', which is not installed: "
                                         r"pip install wandb .*from the command line"):
        manager.check_paths(cfg)
    manager.check_paths(manager.parse_args([]))  # off: not needed

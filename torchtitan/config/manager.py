"""Parse a JobConfig from dataclass defaults, a TOML file and command-line overrides.

Precedence is CLI > TOML > defaults. The TOML file is named on the command line
(``--job.config_file PATH`` or its alias ``--config PATH``); without one, an entry point's
``default_config_file`` (train.py: ``train_configs/debug_model.toml``, what run_train.sh passes),
else the defaults written in ``job_config.py`` (``--config ''`` asks for those explicitly).

Every value is converted and checked against the field's annotated type, so a
typo or a wrong type fails at start-up with a message that names the key, where
it came from and (for unknown keys) the closest valid key -- not 40 minutes into
a run when a component finally reads it. Bounds, closed sets and names (pipeline
schedule, compile backend, model flavor) are checked whether or not their feature
is on; ``check_paths``, called by train.py as a run starts, checks that every path
the run may read exists (a config can be parsed on a machine without its data).

The resolved config is written back as TOML (``dump_config``) with a tiny
serializer: the tree is only ``[section] key = scalar | list``, so a full TOML
writer (and a dependency) is not needed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from pathlib import Path

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # pragma: no cover - older Pythons
    import tomli as tomllib

from torchtitan.config.job_config import JobConfig

CLI = "the command line"
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_USAGE = """\
usage: train.py [--job.config_file FILE | --config FILE] [--section.key VALUE ...]

Precedence: command line > TOML file > defaults. Forms: --section.key VALUE or
--section.key=VALUE. Booleans: --section.flag (true), --section.no_flag or
--section.flag=false (also 0/no). Lists: comma-separated, e.g. --data.datasets c4,stdlib
(an empty string gives an empty list)."""

# Every bound is checked whether or not the feature that reads the key is on: a typo must
# not wait for the day the feature is switched on.
_POSITIVE = (
    "training.steps",
    "training.global_batch_size",
    "training.seq_len",
    "training.gc_freq",
    "metrics.log_freq",
    "checkpoint.interval",
    "parallelism.dp_replicate",
    "parallelism.tp",
    "parallelism.pp",
    "parallelism.cp",
    "parallelism.ep",
    "validation.freq",
    "profiling.profile_freq",
    "comm.init_timeout_seconds",
    "comm.train_timeout_seconds",
)
# -1 means "derive it" (or "all") for these; any other value must be positive.
_POSITIVE_OR_AUTO = ("parallelism.dp_shard", "validation.steps", "validation.local_batch_size")
_NON_NEGATIVE = (
    "model.n_layers", "model.dim", "model.n_kv_heads", "model.vocab_size",
    "moe.aux_loss_coeff", "moe.z_loss_coeff", "moe.load_balance_coeff",
    "optimizer.lr", "optimizer.eps", "optimizer.weight_decay",
    "lr_scheduler.warmup_steps",
    "training.loss_chunk_tokens", "training.max_seconds", "training.memory_limit_gib",
    "data.shuffle_windows", "data.num_workers",
    "parallelism.pp_microbatches",
    "checkpoint.keep_latest_k",
    "metrics.peak_flops",
    "comm.trace_buf_size",
)  # fmt: skip
# key -> (low, high, high allowed)
_FRACTIONS = {
    "optimizer.beta1": (0.0, 1.0, False),
    "optimizer.beta2": (0.0, 1.0, False),
    "lr_scheduler.decay_ratio": (0.0, 1.0, True),
    "lr_scheduler.min_lr_ratio": (0.0, 1.0, True),
    "data.val_fraction": (0.0, 1.0, True),
    "training.memory_margin": (0.0, 1.0, False),
}
_NON_EMPTY = ("data.text_field", "checkpoint.folder")
_INF_OK = ("training.max_seconds", "training.max_norm")  # "no limit"; every other float must be finite


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


class ConfigManager:
    """Builds a validated config object from defaults, a TOML file and CLI overrides.

    ``config_cls`` lets an experiment add sections with its own dataclass tree
    (same two-level shape) without editing the core JobConfig.
    """

    def __init__(self, config_cls: type = JobConfig, default_config_file: str | Path = ""):
        self.config_cls = config_cls
        self.types = _field_types(config_cls)
        self.origin: dict[str, str] = {}
        # Read when the command line names no config file: an entry point's default run (train.py).
        self.default_config_file = str(default_config_file)
        self.config_file = ""  # the TOML file the last parse read ("" = none: the defaults)
        self.used_default = False  # it was default_config_file: the command line named none

    def parse_args(self, argv: list[str] | None = None):
        """Return the resolved config; ``--help``/``-h`` prints every option and exits 0."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if "--help" in argv or "-h" in argv:
            print(self.format_help())
            raise SystemExit(0)
        overrides = _parse_cli(argv, self.types)
        cfg, origin = self.config_cls(), {}
        # The last --config / --job.config_file wins, like any repeated option.
        paths = [value for section, key, value in overrides if (section, key) == ("job", "config_file")]
        self.config_file = paths[-1] if paths else self.default_config_file
        if self.config_file:
            self._apply_toml(cfg, self.config_file, origin)
        self.used_default = not paths and bool(self.config_file)
        if self.used_default:  # recorded in config.toml as the file read
            cfg.job.config_file = self.config_file
            origin["job.config_file"] = "the entry point's default"
        for section, key, value in overrides:
            setattr(getattr(cfg, section), key, value)
            origin[f"{section}.{key}"] = CLI
        validate(cfg, origin)
        self.origin = origin  # where each value came from, for check_paths' messages
        return cfg

    def check_paths(self, cfg) -> None:
        """``check_paths`` of the config this manager parsed (its messages say where each path came from)."""
        check_paths(cfg, self.origin)

    def format_help(self) -> str:
        """Every option grouped by section: name, type and default, then the help text."""
        defaults = self.config_cls()
        lines = [_USAGE]
        if self.default_config_file:
            lines += ["", f"Without --job.config_file / --config this reads {self.default_config_file}",
                      "(what run_train.sh runs); --config '' starts from the built-in defaults listed below."]
        for section, fields in self.types.items():
            lines += ["", f"[{section}]"]
            section_cls = type(getattr(defaults, section))
            helps = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(section_cls)}
            if section == "model":  # the registered families and all their flavors, never a stale list
                from torchtitan.models.registry import model_option_help

                helps.update({k: v for k, v in model_option_help().items() if k in helps})
            for key, tp in fields.items():
                default = _toml_value(getattr(getattr(defaults, section), key))
                lines.append(f"  --{section}.{key} {_type_name(tp)}  (default: {default})")
                lines.append(f"      {helps[key]}")
        return "\n".join(lines)

    def _apply_toml(self, cfg, path: str, origin: dict[str, str]) -> None:
        """Overwrite the defaults in ``cfg`` with every key set in the TOML file."""
        tree = load_toml(path)
        where = str(path)
        for section, table in tree.items():
            if not isinstance(table, dict):
                hint = _suggest_key(self.types, "", section)
                hint = f" did you mean '{hint}'?" if hint else ""
                raise ValueError(
                    f"'{section} = {table!r}' in {where} is outside any [section]; every option "
                    f"lives under one, e.g. [training] then steps = 10.{hint}"
                )
            _lookup_section(self.types, section, where, full_name=section)
            for key, raw in table.items():
                tp = _lookup(self.types, section, key, where)
                value = _convert(_from_toml, tp, raw, f"{section}.{key}", where)
                setattr(getattr(cfg, section), key, value)
                origin[f"{section}.{key}"] = where


def load_toml(path: str | Path) -> dict:
    """Read a TOML file; syntax errors become a ValueError naming file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file '{path}' does not exist (from --job.config_file / --config).")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        # tomllib's message ends with "(at line L, column C)".
        raise ValueError(f"{path} is not valid TOML: {err}. Fix the syntax there and rerun.") from None


def config_to_dict(cfg) -> dict:
    """``{section: {key: value}}``, a plain copy (lists are copied too)."""
    return dataclasses.asdict(cfg)


def config_to_toml(cfg) -> str:
    """Serialize the two-level config tree as TOML that parses back to the same values."""
    lines = ["# Resolved config; rerun it with --job.config_file <this file>."]
    for section, table in config_to_dict(cfg).items():
        lines += ["", f"[{section}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def dump_config(cfg, folder: str | Path) -> Path:
    """Write the resolved config to ``<folder>/config.toml`` and return that path."""
    path = Path(folder) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_toml(cfg), encoding="utf-8")
    return path


def _failer(cfg, origin: dict[str, str] | None):
    """``value_of(dotted)`` and ``fail(dotted, what)``: the one message format of every check."""
    origin = origin or {}

    def value_of(dotted: str):
        section, key = dotted.split(".")
        return getattr(getattr(cfg, section, None), key, None)

    def fail(dotted: str, what: str):
        where = origin.get(dotted, "the default")
        raise ValueError(f"{dotted} {what}, got {value_of(dotted)!r} (from {where}).")

    return value_of, fail


def validate(cfg, origin: dict[str, str] | None = None) -> None:
    """Every value checked at parse time, whether or not its feature is on: closed value sets,
    bounds, values that depend on two keys, and (last, as they import torch) the names torch and
    the model registry must know. Keys of sections a config tree lacks are skipped. Whether the
    paths exist is ``check_paths``'s job: parsing a config is not running it."""
    value_of, fail = _failer(cfg, origin)
    types = _field_types(type(cfg))
    for section, fields in types.items():
        for key, tp in fields.items():
            _check_type_bounds(f"{section}.{key}", tp, value_of(f"{section}.{key}"), fail)

    def present(keys):
        return [dotted for dotted in keys if dotted.split(".")[0] in types]

    for dotted in present(_POSITIVE):
        if value_of(dotted) < 1:
            fail(dotted, "must be a positive integer")
    for dotted in present(_POSITIVE_OR_AUTO):
        if value_of(dotted) != -1 and value_of(dotted) < 1:
            fail(dotted, "must be a positive integer or -1 (derived)")
    if "training" in types and value_of("training.local_batch_size") < -1:
        fail("training.local_batch_size", "must be a positive integer, -1 (global/dp) or 0 (auto)")
    for dotted in present(_NON_NEGATIVE):
        if value_of(dotted) < 0:
            fail(dotted, "must be >= 0")
    for dotted in present(_FRACTIONS):
        low, high, high_ok = _FRACTIONS[dotted]
        value = value_of(dotted)
        if not (low <= value <= high) or (value == high and not high_ok):
            fail(dotted, f"must be in [{low:g}, {high:g}{']' if high_ok else ')'}")
    for dotted in present(_NON_EMPTY):
        if not value_of(dotted).strip():
            fail(dotted, "must not be empty")
    _validate_cross_fields(cfg, fail)
    _validate_torch_names(cfg, fail)


def _check_type_bounds(dotted: str, tp, value, fail) -> None:
    """Closed value sets (the Literal[...] annotations, also of list items) and finite floats."""
    is_list = typing.get_origin(tp) is list
    item_tp = typing.get_args(tp)[0] if is_list else tp
    for item in value if is_list else [value]:
        if typing.get_origin(item_tp) is typing.Literal and item not in typing.get_args(item_tp):
            each = "each " if is_list else ""
            fail(dotted, f"must {each}be one of {', '.join(repr(a) for a in typing.get_args(item_tp))}")
        if item_tp is float and not (math.isfinite(item) or (math.isinf(item) and dotted in _INF_OK)):
            fail(dotted, "must be a finite number" if not is_list else "must hold finite numbers")


def _validate_cross_fields(cfg, fail) -> None:
    """Checks that need two fields; skipped for config trees without these sections."""
    ac = getattr(cfg, "activation_checkpoint", None)
    if ac is not None:  # checked in every mode: it is read as soon as mode = "selective"
        option = ac.selective_ac_option
        if option != "op" and not (option.isdigit() and int(option) >= 1):
            fail("activation_checkpoint.selective_ac_option", "must be 'op' or a positive integer N")
    data = getattr(cfg, "data", None)
    if data is not None and data.weights and len(data.weights) != len(data.datasets):
        fail("data.weights", f"needs one weight per dataset ({len(data.datasets)}: {data.datasets})")
    if data is not None and any(not w > 0 for w in data.weights):
        fail("data.weights", "must all be positive")


# Packages a feature imports only when it is on: (section, key, package, pip name). Checked at
# start, so a run never fails at its first log step or its end for want of one of them.
_FEATURE_PACKAGES = (
    ("metrics", "enable_wandb", "wandb", "wandb"),
    ("metrics", "enable_tensorboard", "tensorboard", "tensorboard"),
    ("float8", "enable_float8_linear", "torchao", "torchao"),
    ("checkpoint", "hf_export_folder", "safetensors", "safetensors"),
)


def _check_packages(cfg, fail) -> None:
    import importlib.util

    for section, key, package, pip_name in _FEATURE_PACKAGES:
        if getattr(getattr(cfg, section, None), key, None) and importlib.util.find_spec(package) is None:
            fail(f"{section}.{key}", f"needs the package {package!r}, which is not installed: "
                 f"pip install {pip_name} (or turn the feature off)")


def check_paths(cfg, origin: dict[str, str] | None = None) -> None:
    """The paths a run reads exist, checked at its start: also those read late in a run or only when
    their feature is on (the initial checkpoint, validation data)."""
    _, fail = _failer(cfg, origin)
    _check_packages(cfg, fail)
    tok = getattr(cfg, "tokenizer", None)
    if tok is not None and tok.path and not Path(tok.path).expanduser().exists():
        fail("tokenizer.path", "does not exist: set tokenizer.path to a tiktoken or sentencepiece .model file or a "
             "Hugging Face tokenizer.json (or its folder), or leave it empty for the embedded tokenizer")
    ckpt, job = getattr(cfg, "checkpoint", None), getattr(cfg, "job", None)
    # Not needed (nor checked) once the run resumes from a complete checkpoint of its own.
    resumes = ckpt is not None and job is not None and ckpt.enable and \
        any((Path(job.dump_folder) / ckpt.folder).glob("step-*/.metadata"))
    if ckpt is not None and ckpt.initial_load_path and not resumes and \
            not (Path(ckpt.initial_load_path) / ".metadata").is_file():
        what = "is not a folder" if not Path(ckpt.initial_load_path).is_dir() else "has no .metadata"
        fail("checkpoint.initial_load_path", f"{what}, so it is not a complete DCP checkpoint (it is read even when "
             "checkpoint.enable is false); point it at a step-N folder or leave it empty")
    data, val = getattr(cfg, "data", None), getattr(cfg, "validation", None)
    if data is not None or val is not None:
        from torchtitan.datasets.sources import HF_ALIASES, local_files  # imports torch: after the checks above

        for dotted, specs, note in (("data.datasets", data, ""),
                                    ("validation.datasets", val, " (checked even when validation is off)")):
            for spec in specs.datasets if specs is not None else []:
                if spec != "stdlib" and spec not in HF_ALIASES and not spec.startswith("hf:"):
                    try:
                        local_files(spec)
                    except ValueError as e:
                        fail(dotted, f"entry {spec!r}: {e}{note}")


def _validate_torch_names(cfg, fail) -> None:
    """Names only torch or the model registry can check: the model family and flavor, the pipeline
    schedule (even when pp = 1), the compile backend (even when compile is off). Imported here:
    the checks above need no torch."""
    m = getattr(cfg, "model", None)
    if m is not None:
        from torchtitan.models.registry import flavor_error, get_spec

        spec = get_spec(m.name)
        if m.flavor not in spec.flavors:
            fail("model.flavor", f"names no {m.name} flavor ({flavor_error(m.name, m.flavor, list(spec.flavors))})")
    p = getattr(cfg, "parallelism", None)
    if p is not None:
        import torch

        from torchtitan.parallelisms.pipeline import available_schedules, read_csv_schedule, resolve_schedule

        names = available_schedules()
        is_file = p.pp_schedule.lower().endswith(".csv") or Path(p.pp_schedule).is_file()
        if p.pp_schedule.lower() not in {n.lower() for n in names} and not is_file:
            fail("parallelism.pp_schedule", f"must be one of {', '.join(names)} (the schedules of torch "
                 f"{torch.__version__}) or a CSV schedule file; checked even when parallelism.pp = 1")
        try:
            plan = resolve_schedule(p.pp_schedule)
            if plan.style == "csv":
                read_csv_schedule(plan.csv_path)
        except (ValueError, OSError) as e:
            fail("parallelism.pp_schedule", f"is not a usable CSV schedule file ({e})")
    comp = getattr(cfg, "compile", None)
    if comp is not None:
        import torch._dynamo

        # list_backends imports every backend (~1 s): not for torch.compile's own default.
        if comp.backend != "inductor" and comp.backend not in torch._dynamo.list_backends(exclude_tags=()):
            fail("compile.backend", f"is not a torch.compile backend of this torch (e.g. "
                 f"{', '.join(torch._dynamo.list_backends())}); checked even when compile.enable is false")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parse_cli(argv: list[str], types) -> list[tuple[str, str, object]]:
    """Turn argv into typed ``(section, key, value)`` overrides, in order."""
    overrides, i = [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ValueError(
                f"unexpected argument {token!r} (from {CLI}): options look like --section.key VALUE; "
                f"pass the TOML file as --job.config_file PATH (or --config PATH)."
            )
        section, key, value, i = _read_option(argv, i, types)
        overrides.append((section, key, value))
    return overrides


def _read_option(argv: list[str], i: int, types) -> tuple[str, str, object, int]:
    """Parse the option at ``argv[i]`` (and its value); return it and the next index."""
    name, has_eq, text = argv[i][2:].partition("=")
    i += 1
    section, key, negated = _resolve_name(name, types)
    tp = types[section][key]
    if negated:
        if has_eq:
            raise ValueError(f"--{name} takes no value (from {CLI}); use --{section}.{key}=true|false instead.")
        return section, key, False, i
    if not has_eq and tp is bool:
        # A bare flag means True; an explicit literal right after it is accepted too.
        if i < len(argv) and argv[i].lower() in _TRUE | _FALSE:
            text, i = argv[i], i + 1
        else:
            text = "true"
    elif not has_eq:
        if i >= len(argv) or argv[i].startswith("--"):
            raise ValueError(
                f"--{section}.{key} is missing its value (from {CLI}); it expects {_type_name(tp)}: "
                f"write --{section}.{key} VALUE or --{section}.{key}=VALUE."
            )
        text, i = argv[i], i + 1
    return section, key, _convert(_from_text, tp, text, f"{section}.{key}", CLI), i


def _resolve_name(name: str, types) -> tuple[str, str, bool]:
    """Map an option name to ``(section, key, negated)``; dashes are read as underscores."""
    name = name.replace("-", "_")
    if name == "config":
        return "job", "config_file", False
    section, dot, key = name.partition(".")
    if not dot:
        # e.g. --steps: no section, but the key may exist in one.
        hint = _suggest_key(types, "", name)
        hint = f"; did you mean '{hint}'?" if hint else ""
        raise ValueError(f"option '--{name}' (from {CLI}) must be written --section.key{hint}")
    _lookup_section(types, section, CLI, full_name=name)
    fields = types[section]
    if key not in fields and key.startswith("no_") and fields.get(key[3:]) is bool:
        return section, key[3:], True
    _lookup(types, section, key, CLI)
    return section, key, False


# ---------------------------------------------------------------------------
# Types and conversions
# ---------------------------------------------------------------------------


def _field_types(config_cls: type) -> dict[str, dict[str, type]]:
    """``{section: {key: annotated type}}`` read from the dataclass tree."""
    hints = typing.get_type_hints(config_cls)
    types = {}
    for section in dataclasses.fields(config_cls):
        section_hints = typing.get_type_hints(hints[section.name])
        section_fields = dataclasses.fields(hints[section.name])
        types[section.name] = {f.name: section_hints[f.name] for f in section_fields}
    return types


def _type_name(tp) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        return f"list[{_type_name(item_tp)}]"
    return tp.__name__


def _base_type(tp):
    """A Literal's values are strings here: parsed as str, checked against the set in validate()."""
    return str if typing.get_origin(tp) is typing.Literal else tp


def _convert(converter, tp, raw, dotted: str, where: str):
    """Apply ``converter``; any mismatch becomes one message naming key, type and value."""
    try:
        return converter(tp, raw)
    except (TypeError, ValueError):
        hint = " (true/false, 1/0 or yes/no)" if tp is bool else ""
        if tp is bool and isinstance(raw, str) and where != CLI:
            hint = " (write true/false without quotes)"
        raise ValueError(f"{dotted} expects {_type_name(tp)}{hint}, got {raw!r} (from {where}).") from None


def _from_text(tp, text: str):
    """Convert a command-line string to ``tp``; lists are comma-separated."""
    tp = _base_type(tp)
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp)
        items = [part.strip() for part in text.split(",")] if text.strip() else []
        return [_from_text(item_tp, item) for item in items]
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ValueError(text)
    return tp(text)  # str, int or float; int("1.5") and float("x") raise ValueError


def _from_toml(tp, value):
    """Check a TOML value against ``tp``; ints are accepted (and widened) for floats."""
    tp = _base_type(tp)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise TypeError(value)
        (item_tp,) = typing.get_args(tp)
        return [_from_toml(item_tp, item) for item in value]
    # bool is a subclass of int in Python, so it must be told apart explicitly.
    if isinstance(value, bool) != (tp is bool):
        raise TypeError(value)
    if tp is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, tp):
        raise TypeError(value)
    return value


# ---------------------------------------------------------------------------
# Unknown names
# ---------------------------------------------------------------------------


def _lookup_section(types, section: str, where: str, full_name: str) -> None:
    """Raise a ValueError with a suggestion if ``section`` is not a section."""
    if section in types:
        return
    close = difflib.get_close_matches(section, list(types), n=1)
    key = full_name.partition(".")[2]
    if close and key in types[close[0]]:
        hint = f"did you mean '{close[0]}.{key}'?"
    elif close:
        hint = f"did you mean '{close[0]}'?"
    else:
        hint = f"valid sections: {', '.join(types)}."
    what = f"'{section}' in '{full_name}'" if full_name != section else f"[{section}]"
    raise ValueError(f"unknown section {what} (from {where}); {hint}")


def _lookup(types, section: str, key: str, where: str):
    """Return the type of ``section.key``, or raise a ValueError naming the closest key."""
    if key in types[section]:
        return types[section][key]
    hint = _suggest_key(types, section, key)
    hint = f"did you mean '{hint}'?" if hint else f"valid keys of [{section}]: {', '.join(types[section])}."
    raise ValueError(
        f"unknown option '{section}.{key}' (from {where}); {hint} Run with --help to list every option."
    )


def _suggest_key(types, section: str, key: str) -> str | None:
    """Closest dotted key: a near key in the same section, the same key elsewhere, or any near key."""
    if section in types:
        close = difflib.get_close_matches(key, list(types[section]), n=1)
        if close:
            return f"{section}.{close[0]}"
    owners = [name for name, fields in types.items() if key in fields]
    if owners:
        return f"{owners[0]}.{key}"
    every = [f"{name}.{k}" for name, fields in types.items() for k in fields]
    close = difflib.get_close_matches(f"{section}.{key}", every, n=1)
    return close[0] if close else None


# ---------------------------------------------------------------------------
# TOML writing
# ---------------------------------------------------------------------------

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_value(value) -> str:
    """One TOML value: bools lowercase, floats via repr (round-trips, incl. inf/nan), lists as arrays."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'

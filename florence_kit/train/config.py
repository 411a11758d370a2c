"""A run's options: :class:`TrainConfig`, its checks, ``config.yaml`` written, and ``--config`` read back.

``finetune --config run.yaml`` reads a run's options from a YAML file; options typed on the command line win.

The file uses TrainConfig's field names, the very names a run's own ``config.yaml`` holds, so
``finetune --config RUN/config.yaml --output-dir NEW`` repeats RUN. Everything is derived from the
TrainConfig dataclass and the command's click parameters, so options added later are covered
without touching this module. A misspelt key is an error with a "did you mean", never ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError
from florence_kit.train.checkpoints import TrainState

SCHEDULES = ("linear", "cosine", "constant")
FITS = ("off", "auto")  # --fit: off, or micro-batch, accumulation and checkpointing from model/memory.py


@dataclass
class TrainConfig:
    """Every option of a fine-tuning run; written to ``config.yaml`` in the run folder."""

    task: str
    model: str
    output_dir: Path
    dataset: str | None = None
    mode: str = "full"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None  # None: the mode's default (model/modes.TABLE)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    seed: int = 0
    too_long: str = "drop"
    max_target_length: int | None = None  # grow the position tables to N first (model/positions.py)
    max_samples: int | None = None
    num_workers: int = 0
    log_every: int = 10
    overwrite: bool = False
    tasks_dirs: list[Path] = field(default_factory=list)
    # --- tasks ---
    streaming: bool = False
    mix_weights: str | None = None
    # --- lora ---
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_vision: bool = False
    optim: str | None = None  # adamw | adamw8bit | paged-adamw8bit; None: adamw (qlora: 8-bit, paged on CUDA)
    # --- trainspeed ---
    # None: decided by --speed (florence_kit/train/speed.py); True/False when typed (--[no-]cache-vision-features)
    cache_vision_features: bool | None = None
    vision_cache_dir: Path | None = None  # None: <output_dir>/vision_cache
    prepare_data: bool | None = None  # decode/resize each distinct image once, tokenise once (data/prepared.py)
    prepare_dir: Path | None = None  # None: <output_dir>/prepared
    group_by_image: bool | None = None  # a page's questions in one batch (with --cache-vision-features: one DaViT pass)
    group_by_length: bool = False  # batches of similar length (needs --prepare-data)
    speed: str = "auto"  # auto: the three switches above decided by the run (train/speed.py); off: plain path
    attn: str = "auto"  # attention kernel of the language model (model/attention.py)
    compile: bool = False  # regional torch.compile of the DaViT blocks and BART layers (model/compiling.py)
    # --- run folder ---
    report_to: str = "none"
    push_to_hub: str | None = None
    skip_bad_images: bool = False
    # --- runtime ---
    precision: str = "auto"
    strategy: str = "auto"  # auto | ddp | fsdp: how several processes share the run (train/sharding.py)
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: str | None = None
    eval_every: int = 0
    eval_max_samples: int | None = 200
    early_stopping_patience: int = 0
    # --- memory ---
    gradient_checkpointing: bool = False  # BART layers + DaViT blocks (model/activation_checkpointing.py)
    fit: str = "off"  # off | auto: micro-batch, accumulation and checkpointing from florence_kit.model.memory
    # --- regions ---
    box_format: str | None = None  # region tasks: how the data writes boxes (None: the task's own)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float
    seconds: float
    dropped: int
    trainable: dict[str, tuple[int, int]]
    state: TrainState = field(default_factory=TrainState)
    start_step: int = 0  # the checkpoint's step a resumed run started from: ``seconds`` timed the steps after it


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Never write over an earlier run by accident."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir '{out}' is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        from florence_kit.train.runfolder import describe_output_dir

        raise UserError(describe_output_dir(out))


# Options about the command and its output folder, not the training: config.yaml records them under ``run``
PER_COMMAND: dict[str, Any] = {"resume": None, "overwrite": False}


def write_config(cfg: TrainConfig, out: Path, extra: dict[str, Any]) -> None:
    """Every resolved option at the top level (``--config`` reads it back), then ``versions`` and ``run``.

    ``run`` records facts about this run (task origin, example counts, ``--resume``/``--overwrite`` if
    given, the git commit of the working directory); ``versions`` the libraries and florence-kit's own
    commit. ``--config`` ignores both.
    """
    from florence_kit.common.versions import git_commit, versions
    from florence_kit.train.config import options_dict
    from florence_kit.train.runfolder import RunFolder

    data = options_dict(cfg)
    given = {k: data[k] for k, default in PER_COMMAND.items() if data[k] != default}
    data.update(PER_COMMAND)  # --config RUN/config.yaml --output-dir NEW must not resume or overwrite anything
    data.update(versions=versions(), run={**extra, **given, "git_commit": git_commit(Path.cwd())})
    RunFolder(out).write_config(data)


# What write_config records beside the options (for people, not for the run): accepted and ignored.
RECORD_KEYS = ("versions", "run")


def config_from_options(options: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a command's parsed options named as its fields (``finetune``'s parameters).

    Choices arrive as enums and are kept as their values; options that are no field (``--config``,
    ``--quiet``) are left out; fields the command does not offer keep their defaults.
    """
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v.value if isinstance(v, Enum) else v for k, v in options.items() if k in names}
    values["task"] = values.get("task") or ""  # optional with --config, which may name it
    values["tasks_dirs"] = list(values.get("tasks_dirs") or [])
    return TrainConfig(**values)


def option_fields(cls: type) -> dict[str, Any]:
    """TrainConfig's fields and their resolved type hints."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def options_dict(cfg: Any) -> dict[str, Any]:
    """Every resolved option as plain YAML values (paths as strings), in TrainConfig's order."""

    def plain(value: Any) -> Any:
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    """The option mapping in ``path``; unknown keys are errors naming the closest option."""
    import yaml

    if not path.is_file():
        raise UserError(f"--config '{path}' does not exist" if not path.exists() else f"--config '{path}' is a folder")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"--config '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise UserError(f"--config '{path}' is not valid YAML ({' '.join(str(exc).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"--config '{path}' must be a mapping of option: value, got {type(data).__name__}")
    known = option_fields(cls)
    for key in data:
        if key in known or key in RECORD_KEYS:
            continue
        close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"--config '{path}': unknown option '{key}'; {hint}options: {', '.join(known)}")
    return {k: v for k, v in data.items() if k not in RECORD_KEYS}


def _convert(key: str, value: Any, hint: Any, param: Any, ctx: Any, origin: Path) -> Any:
    """Validate one file value with the CLI's own parameter type (choices, ints, floats) and the field's type."""
    allows_none = type(None) in typing.get_args(hint)
    if value is None:
        if allows_none:
            return None
        raise UserError(f"--config '{origin}': option '{key}' cannot be empty")
    is_list = typing.get_origin(hint) is list
    if is_list and not isinstance(value, list):
        value = [value]
    if not is_list and isinstance(value, (list, dict)):
        raise UserError(f"--config '{origin}': option '{key}' takes one value, got a {type(value).__name__}")
    if param is not None:
        try:  # the CLI's own parsing: choices, numbers ("1e-4" is a string to YAML), paths, lists
            value = param.process_value(ctx, value)
        except Exception as exc:
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            raise UserError(f"--config '{origin}': option '{key}' = {value!r}: {' '.join(message.split())}") from None
    value = [v.value if hasattr(v, "value") else v for v in value] if is_list else getattr(value, "value", value)
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    if Path in (hint, *inner) and not is_list:
        return Path(value)
    if is_list and typing.get_args(hint) == (Path,):
        return [Path(v) for v in value]
    return value


def apply_config_file(cfg: Any, path: Path, ctx: Any) -> Any:
    """``cfg`` with every option from the file that was not given on the command line."""
    data = read_config_file(path, type(cfg))
    fields = option_fields(type(cfg))
    params = {p.name: p for p in ctx.command.params}
    updates = {}
    for key, value in data.items():
        source = ctx.get_parameter_source(key) if key in params else None
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            continue  # the command line wins over the file
        updates[key] = _convert(key, value, fields[key], params.get(key), ctx, path)
    return dataclasses.replace(cfg, **updates)


def check_options(cfg: Any) -> None:
    """Values no run can use: one clear message before anything is loaded or written."""
    positive = ("batch_size", "grad_accum", "log_every")
    for name in positive:
        if getattr(cfg, name, 1) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "max_samples"):
        value = getattr(cfg, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 when given, got {value}")
    for name in ("warmup_steps", "num_workers", "weight_decay", "max_grad_norm"):
        if getattr(cfg, name, 0) < 0:
            raise UserError(f"--{name.replace('_', '-')} cannot be negative, got {getattr(cfg, name)}")
    if not cfg.epochs > 0:
        raise UserError(f"--epochs must be positive, got {cfg.epochs}")
    # None: the mode's default; 0 is allowed: a run that only evaluates (--eval-every) or checks the pipeline
    if cfg.lr is not None and not cfg.lr >= 0:
        raise UserError(f"--lr cannot be negative, got {cfg.lr}")
    if getattr(cfg, "group_by_length", False) and getattr(cfg, "prepare_data", False) is False:
        raise UserError("--group-by-length needs --prepare-data (the lengths come from its tokenisation)")
    if getattr(cfg, "group_by_length", False) and getattr(cfg, "group_by_image", False):
        raise UserError("choose one of --group-by-image and --group-by-length")
    if not cfg.task:
        raise UserError("no task: pass TASK (see `florence-kit tasks list`) or a --config file with 'task:'")

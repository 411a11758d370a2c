"""Every command's options as users see them (names, defaults, types, choices, help), pinned in a fixture.

The options are declared once in cli/common.py and shared; this test proves that sharing them changes
nothing a user types or reads. After a deliberate change to an option, regenerate the fixture:
``python tests/test_cli_options.py`` and review its diff.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Any

import typer

from florence_kit.cli import app
from florence_kit.train.config import TrainConfig, apply_config_file, config_from_options

FIXTURE = Path(__file__).parent / "fixtures" / "cli_options.json"


def _plain(value: Any) -> Any:
    """A default as JSON: enums by value, paths as strings, sequences as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _type(annotation: Any) -> tuple[str, list[Any] | None]:
    """The value type users type, and its choices for an enum (the values, not the class that holds them)."""
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "choice", [member.value for member in annotation]
    name = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    return (name or str(annotation).replace("pathlib.", "")), None


def _param(param: Any) -> dict[str, Any]:
    """What users see of one parameter: its names, value type, choices, default, whether required, its help."""
    kind, choices = _type(param.type_descriptor.annotation)
    info = param.type_descriptor.parameter_info
    record: dict[str, Any] = {
        "kind": type(param).__name__.removeprefix("Typer").lower(),
        "opts": list(param.opts),
        "secondary_opts": list(param.secondary_opts),
        "type": kind,
        "required": param.required,
        "multiple": param.multiple,
        "default": _plain(param.default),
        "is_flag": bool(getattr(param, "is_flag", False)),
    }
    if choices is not None:
        record["choices"] = choices
    for extra in ("metavar", "hidden", "envvar", "min", "max"):
        value = getattr(info, extra, None)
        if value not in (None, False):
            record[extra] = _plain(value)
    record["help"] = param.help
    return record


def _commands(command: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf command under ``command``, keyed by its full name ('tasks list')."""
    if hasattr(command, "commands"):  # a group: its commands, by name
        found: dict[str, Any] = {}
        for name, sub in sorted(command.commands.items()):
            found.update(_commands(sub, f"{prefix}{name} "))
        return found
    # options by the name users type (--tasks-dir), not the function's parameter name; arguments as usage shows them
    return {prefix.strip(): {p.opts[0] if type(p).__name__ == "TyperOption" else p.name.upper(): _param(p)
                             for p in command.params}}


def surface() -> dict[str, Any]:
    """The whole CLI's options as plain JSON."""
    return _commands(typer.main.get_command(app))


def test_every_option_is_as_pinned() -> None:
    pinned = json.loads(FIXTURE.read_text(encoding="utf-8"))
    live = json.loads(json.dumps(surface()))
    assert sorted(live) == sorted(pinned), "commands added or removed"
    for command, params in pinned.items():
        assert list(live[command]) == list(params), f"{command}: parameters added, removed or reordered"
        for name, record in params.items():
            assert live[command][name] == record, f"{command} {name} changed"


def test_the_fixture_covers_the_options_users_know() -> None:
    pinned = json.loads(FIXTURE.read_text(encoding="utf-8"))
    assert len(pinned["finetune"]) >= 52 and {"predict", "eval", "serve", "tasks list"} <= set(pinned)
    assert pinned["finetune"]["--schedule"]["choices"] == ["linear", "cosine", "constant"]
    assert pinned["eval"]["--output-dir"]["default"] == "runs/eval" and pinned["eval"]["TASK"]["required"]


def _finetune() -> Any:
    return typer.main.get_command(app).commands["finetune"]


def test_finetune_offers_every_trainconfig_field_with_its_default() -> None:
    params = {p.name: p for p in _finetune().params}
    not_options = {"log_every"}  # set by the code, not the user
    for f in dataclasses.fields(TrainConfig):
        if f.name in not_options:
            continue
        assert f.name in params, f"TrainConfig.{f.name} has no finetune option of the same name"
        if f.default is not dataclasses.MISSING:
            assert _plain(params[f.name].default) == _plain(f.default), f"--{f.name} and TrainConfig disagree"


def test_finetune_options_fill_trainconfig_by_name() -> None:
    ctx = _finetune().make_context("finetune", [
        "docvqa", "--schedule", "cosine", "--optim", "paged-adamw8bit", "--mode", "frozen-encoder",
        "--tasks-dir", "a", "--tasks-dir", "b", "--box-format", "xyxy", "--no-prepare-data", "--lr", "2e-5"])
    cfg = config_from_options(ctx.params)
    assert (cfg.task, cfg.schedule, cfg.optim, cfg.mode, cfg.box_format) == (
        "docvqa", "cosine", "paged-adamw8bit", "frozen-encoder", "xyxy")
    assert cfg.tasks_dirs == [Path("a"), Path("b")] and cfg.prepare_data is False and cfg.lr == 2e-5
    assert cfg.output_dir == Path("runs/finetune") and cfg.model == "base" and cfg.group_by_image is None
    plain = dataclasses.asdict(cfg)
    assert not [k for k, v in plain.items() if isinstance(v, enum.Enum)], "choices reach TrainConfig as enums"
    assert config_from_options(_finetune().make_context("finetune", ["--quiet"]).params).task == ""


def test_a_typed_option_wins_over_the_config_file(tmp_path: Path) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("task: docvqa\ntasks_dirs: [from-file]\nschedule: cosine\nseed: 7\n")

    def resolved(*typed: str) -> TrainConfig:
        ctx = _finetune().make_context("finetune", ["--config", str(run_yaml), *typed])
        return apply_config_file(config_from_options(ctx.params), run_yaml, ctx)

    cfg = resolved()
    assert (cfg.tasks_dirs, cfg.schedule, cfg.seed, cfg.task) == ([Path("from-file")], "cosine", 7, "docvqa")
    cfg = resolved("--tasks-dir", "typed", "--seed", "3", "--schedule", "constant")
    assert (cfg.tasks_dirs, cfg.schedule, cfg.seed) == ([Path("typed")], "constant", 3)


def _callbacks() -> dict[str, Any]:
    """Every command's function, by its full name."""
    found = {info.name: info.callback for info in app.registered_commands}
    for group in app.registered_groups:
        found.update({f"{group.name} {info.name}": info.callback for info in group.typer_instance.registered_commands})
    return found


def test_an_option_written_alike_in_several_commands_is_one_shared_type() -> None:
    """The same help pasted into two commands is what cli/common's shared types are for."""
    declared: dict[tuple[str, str], set[int]] = {}
    for fn in _callbacks().values():
        for hint in typing.get_type_hints(inspect.unwrap(fn), include_extras=True).values():
            for info in getattr(hint, "__metadata__", ()):
                if isinstance(info, typer.models.ParameterInfo) and info.help:
                    declared.setdefault((type(info).__name__, info.help), set()).add(id(info))
    pasted = [text for (_, text), objects in declared.items() if len(objects) > 1]
    assert not pasted, f"declared more than once (make it one type in cli/common.py): {pasted}"


if __name__ == "__main__":
    FIXTURE.write_text(json.dumps(surface(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    sys.stdout.write(f"wrote {FIXTURE}\n")

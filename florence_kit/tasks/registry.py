"""Finds tasks: the built-in task folder, extra folders, and the ``florence_kit.tasks`` entry points.

Built-in tasks go through the same folder scanner as users' task folders. Files whose name starts
with ``_`` are bases for ``include:`` and are not tasks themselves. Plugins (entry points) are imported
*before* any folder is scanned, so a metric a plugin registers can be named by any task file.
A task's ``group`` (e.g. ``cauldron``) names every task that declares it, for training on a mix.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path

from florence_kit.common.errors import UserError
from florence_kit.tasks.spec import TaskSpec, load_task_specs


def _builtin_dir() -> Path:
    """The built-in task files: ``florence_kit/builtin_tasks`` in an installed wheel, ``tasks/`` in a checkout."""
    packaged = Path(__file__).resolve().parents[1] / "builtin_tasks"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "tasks"


BUILTIN_DIR = _builtin_dir()
ENV_VAR = "FLORENCE_KIT_TASKS_PATH"
ENTRY_POINT_GROUP = "florence_kit.tasks"


def task_files(folder: Path) -> list[Path]:
    """Every task file under ``folder`` (recursively), in a stable order."""
    return sorted(p for p in folder.rglob("*.y*ml") if p.suffix in {".yaml", ".yml"} and not p.name.startswith("_"))


def scan_folder(folder: Path) -> list[TaskSpec]:
    """Load every task file in a folder; a broken file is an error naming it."""
    if not folder.is_dir():
        raise UserError(f"task folder '{folder}' does not exist")
    return [spec for path in task_files(folder) for spec in load_task_specs(path)]


def _plugin_fix(ep: metadata.EntryPoint) -> str:
    """How to get rid of a broken plugin: reinstall or uninstall the distribution that declares it."""
    dist = ep.dist.name if ep.dist is not None else "the package that declares it"
    return f"reinstall or fix it, or remove it with `pip uninstall {dist}`"


def _load_plugins(errors: list[str]) -> list[tuple[str, object, str]]:
    """Import every ``florence_kit.tasks`` entry point (registering the metrics its package defines);
    one that fails is one line in ``errors`` naming it and the fix, and the others still load."""
    loaded = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        label = f"plugin '{ep.name}' ({ep.value})"
        try:
            loaded.append((label, ep.load(), _plugin_fix(ep)))
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not hide the other tasks
            errors.append(f"{label} failed to load ({type(exc).__name__}: {exc}); {_plugin_fix(ep)}")
    return loaded


def _plugin_specs(label: str, obj: object, fix: str) -> list[TaskSpec]:
    """An entry point names a package (a folder of task files, scanned) or a callable returning TaskSpecs."""
    if not callable(obj):
        module = importlib.import_module(obj.__name__) if hasattr(obj, "__name__") else obj
        if not getattr(module, "__file__", None):
            raise UserError(f"{label} names neither a package with task files nor a function; {fix}")
        return scan_folder(Path(module.__file__).parent)
    try:
        specs = list(obj())
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{label} failed to list its tasks ({type(exc).__name__}: {exc}); {fix}") from None
    bad = [s for s in specs if not isinstance(s, TaskSpec)]
    if bad:
        raise UserError(f"{label} returned {type(bad[0]).__name__}, not TaskSpec; {fix}")
    return specs


def extra_dirs(tasks_dirs: Sequence[Path] = ()) -> list[Path]:
    """Folders from ``--tasks-dir`` followed by those in ``FLORENCE_KIT_TASKS_PATH``."""
    env = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*tasks_dirs, *env]


def _same_file(a: str, b: str) -> bool:
    """Whether two origins are one task file, however its folder was spelled."""
    return Path(a).is_file() and Path(b).is_file() and Path(a).resolve() == Path(b).resolve()


def _sources(tasks_dirs: Sequence[Path], errors: list[str]) -> Iterable[Callable[[], list[TaskSpec]]]:
    """One loader per task file (built-in, then extra folders) and per plugin, each failing on its own."""
    plugins = _load_plugins(errors)  # first: a plugin's metrics may be named by any task file
    for folder in [BUILTIN_DIR, *extra_dirs(tasks_dirs)]:
        if not folder.is_dir():
            errors.append(f"task folder '{folder}' does not exist")
            continue
        yield from (functools.partial(load_task_specs, path) for path in task_files(folder))
    yield from (functools.partial(_plugin_specs, *plugin) for plugin in plugins)


def collect_tasks(tasks_dirs: Sequence[Path] = ()) -> tuple[dict[str, TaskSpec], list[str]]:
    """Every task that loads, by name, and one line per task file or plugin that does not (or that
    redefines a name): ``tasks list`` shows both, so one broken source never hides the others."""
    found: dict[str, TaskSpec] = {}
    errors: list[str] = []
    for load in _sources(tasks_dirs, errors):
        try:
            specs = load()
        except UserError as exc:
            errors.append(str(exc))
            continue
        for spec in specs:
            if spec.name in found and _same_file(found[spec.name].origin, spec.origin):
                continue  # one folder reached twice (--tasks-dir and the environment, or nested): one task
            if spec.name in found:
                errors.append(f"task '{spec.name}' is defined twice: {found[spec.name].origin} and {spec.origin}; "
                              "rename one of them")
                continue
            found[spec.name] = spec
    return found, errors


def all_tasks(tasks_dirs: Sequence[Path] = ()) -> dict[str, TaskSpec]:
    """Every task by name; a broken task file or plugin, or two tasks with one name, is an error naming them."""
    found, errors = collect_tasks(tasks_dirs)
    if errors:
        more = f" (and {len(errors) - 1} more: see `florence-kit tasks list`)" if len(errors) > 1 else ""
        raise UserError(errors[0] + more)
    return found


def get_task(name: str, tasks_dirs: Sequence[Path] = ()) -> TaskSpec:
    """One task by name; an unknown name answers with the closest names."""
    tasks = all_tasks(tasks_dirs)
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(name, tasks, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise UserError(f"unknown task '{name}'; {hint}see `florence-kit tasks list`")


def groups(tasks: dict[str, TaskSpec]) -> dict[str, list[str]]:
    """Group name -> its tasks' names (sorted)."""
    out: dict[str, list[str]] = {}
    for name, spec in sorted(tasks.items()):
        if spec.group:
            out.setdefault(spec.group, []).append(name)
    return out


def resolve_tasks(selection: str, tasks_dirs: Sequence[Path] = ()) -> list[TaskSpec]:
    """``docvqa``, ``cauldron/ai2d,cauldron/chartqa`` or a group name (``cauldron``) -> the tasks, in order."""
    names = [n.strip() for n in selection.split(",") if n.strip()]
    if not names:
        raise UserError("no task given; see `florence-kit tasks list`")
    tasks = all_tasks(tasks_dirs)
    by_group = groups(tasks)
    out: list[TaskSpec] = []
    for name in names:
        if name in tasks:
            chosen = [tasks[name]]
        elif name in by_group:
            chosen = [tasks[n] for n in by_group[name]]
        else:
            close = difflib.get_close_matches(name, [*tasks, *by_group], n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(f"unknown task '{name}'; {hint}see `florence-kit tasks list`")
        out += [spec for spec in chosen if spec not in out]
    return out

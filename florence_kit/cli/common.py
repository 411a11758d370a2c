"""What every command shares: the error boundary and common options."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from florence_kit.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])
console = Console()
err_console = Console(stderr=True)

TasksDirOption = Annotated[
    list[Path] | None,
    typer.Option("--tasks-dir", help="Extra folder of task files (repeatable; also FLORENCE_KIT_TASKS_PATH)."),
]


def quiet_libraries() -> None:
    """Our own progress bars and messages are what users read; silence the libraries' chatter."""
    for var, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(var, value)


def user_errors(fn: F) -> F:
    """Turn a UserError into one red line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            # escaped: a message such as "pip install 'florence-kit[ui]'" is not Rich markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]

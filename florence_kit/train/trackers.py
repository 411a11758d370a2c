"""``--report-to tensorboard|wandb|none``: experiment trackers through Accelerate's own tracker classes.

The packages are optional extras; a missing one is a clear error before anything is loaded or written.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError

TRACKERS = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
PROJECT = "florence-kit"


def check_report_to(name: str) -> None:
    """Fail early when the tracker is unknown or its package is not installed."""
    if name not in TRACKERS:
        raise UserError(f"--report-to must be one of {', '.join(TRACKERS)}, got '{name}'")
    if name != "none" and not any(importlib.util.find_spec(p) for p in PACKAGES[name]):
        raise UserError(
            f"--report-to {name} needs the '{PACKAGES[name][0]}' package: pip install 'florence-kit[{name}]' "
            "(or pass --report-to none)"
        )


def accelerator_kwargs(report_to: str, output_dir: Path) -> dict[str, Any]:
    """``Accelerator(**...)`` arguments: logs go under the run folder (``RUN_DIR/tensorboard/``)."""
    if report_to == "none":
        return {}
    return {"log_with": report_to, "project_dir": str(output_dir)}


def start(accelerator: Any, report_to: str, options: dict[str, Any], output_dir: Path) -> None:
    """Open the tracker with the run's options as its hyper-parameters (scalars only, as TensorBoard wants)."""
    if report_to == "none":
        return
    hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in options.items()}
    if report_to == "tensorboard":
        accelerator.init_trackers("tensorboard", config=hparams)
    else:
        accelerator.init_trackers(PROJECT, config=hparams,
                                  init_kwargs={"wandb": {"name": Path(output_dir).name, "dir": str(output_dir)}})

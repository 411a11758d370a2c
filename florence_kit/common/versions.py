"""Package versions and git commit, recorded in every run's config for reproducibility."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("florence-kit", "torch", "transformers", "datasets", "accelerate", "peft", "tokenizers")


def git_commit(where: Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the repository holding ``where`` (florence-kit's source by default); None if none."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where or Path(__file__).parent, capture_output=True, text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["git_commit"] = git_commit()
    return found

"""``--push-to-hub REPO`` and ``florence-kit push RUN_DIR REPO``: upload a run's model, processor and card.

Reachability and login are checked before training starts: an offline machine or a missing token is
a one-line error in seconds, not after hours of training.
"""

from __future__ import annotations

import os
from pathlib import Path

from florence_kit.common.errors import UserError, first_line

# Never uploaded: pickled weights / optimizer states (safetensors only), and sub-folders (checkpoints, logs).
NEVER = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}


def check_can_push(repo: str) -> None:
    """A valid repo id, online, logged in: otherwise one clear error now."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise UserError(f"'{repo}' is not a valid hub repo id (owner/name): {str(exc).splitlines()[0]}") from None
    if is_offline():
        raise UserError(
            "cannot push to the hub while offline (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE, or train without "
            "--push-to-hub and upload later with `florence-kit push RUN_DIR REPO`"
        )
    import huggingface_hub

    try:
        huggingface_hub.HfApi().whoami()
    except Exception as exc:  # no token, bad token, no network: all end the same way for the user
        first = first_line(exc)
        raise UserError(
            f"cannot push to '{repo}': the hub did not accept this machine ({type(exc).__name__}: {first}); "
            "log in with `hf auth login` (or set HF_TOKEN) and check the network"
        ) from None


def files_to_push(run_dir: Path) -> list[str]:
    """The top-level files of a run folder: weights, processor, card, config and training log (no pickles)."""
    from florence_kit.train.runfolder import RunFolder

    if not RunFolder(run_dir).is_run() or not any(run_dir.glob("*.safetensors")):
        raise UserError(
            f"'{run_dir}' is not a finished run folder (needs config.yaml and *.safetensors weights); "
            "pass the --output-dir of a `florence-kit finetune` run"
        )
    return sorted(p.name for p in run_dir.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix not in NEVER)


def push_run(run_dir: Path, repo: str, private: bool = False) -> str:
    """Create the repo if needed and upload the run's files in one commit; returns the repo URL."""
    import huggingface_hub

    files = files_to_push(run_dir)
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(run_dir), allow_patterns=files,
                          commit_message=f"florence-kit run {run_dir.name}")
    except Exception as exc:
        first = first_line(exc)
        raise UserError(
            f"upload of '{run_dir}' to '{repo}' failed ({type(exc).__name__}: {first}); the run folder is intact: "
            f"retry with `florence-kit push {run_dir} {repo}`"
        ) from None
    return str(url)

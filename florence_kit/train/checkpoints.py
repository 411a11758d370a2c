"""Training checkpoints: written atomically, rotated, and resumed exactly.

A checkpoint is ``<run>/checkpoints/step-N/``: Accelerate's ``save_state`` files (optimizer,
scheduler, grad scaler, one RNG file per process) plus ``model.safetensors`` holding only the
*trainable* parameters (the whole model in full fine-tuning, the adapter in LoRA; frozen weights are
the base model's and are reloaded from ``--model``), and ``trainer_state.json`` (step, epoch, data
position, best metric, counters, and the settings a resume must not change).

It is written to ``checkpoints/.tmp-step-N`` and renamed into place only when complete, so a process
killed at any moment leaves either a whole checkpoint or a ``.tmp-`` folder that is ignored (and
cleared on the next save).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")
PATH_KEYS = ("model", "dataset")  # fingerprint keys that may name a local folder or file


def normal_source(value: Any) -> Any:
    """A local path resolved, so that ``data``, ``./data/`` and ``/abs/data`` match; a hub id stays as typed."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def _same(key: str, saved: Any, current: Any) -> bool:
    if key in PATH_KEYS:  # checkpoints written before paths were resolved hold them as typed
        return normal_source(saved) == normal_source(current)
    return saved == current


@dataclass
class TrainState:
    """Where a run is; everything here round-trips through ``trainer_state.json``."""

    step: int = 0  # optimizer steps taken (a step skipped for a non-finite loss counts)
    epoch: int = 0
    batch: int = 0  # micro-batches of ``epoch`` already consumed, per process
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    elapsed_s: float = 0.0  # training seconds up to this step: metrics.jsonl's elapsed_s goes on from it

    def to_json(self, fingerprint: dict[str, Any]) -> str:
        return json.dumps({**asdict(self), "fingerprint": fingerprint}, indent=2) + "\n"

    @classmethod
    def from_file(cls, path: Path) -> tuple[TrainState, dict[str, Any]]:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}), data.get("fingerprint", {})


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp-`` folders are not checkpoints)."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(value: str, run_dir: Path) -> Path:
    """``--resume latest`` → the run's newest checkpoint; ``--resume PATH`` → that checkpoint folder."""
    if value == "latest":
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(
                f"--resume latest: no checkpoint in '{checkpoints_dir(run_dir)}'; "
                "pass --resume PATH or start the run without --resume"
            )
        return found[-1]
    path = Path(value).expanduser()
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"--resume '{path}' is not a checkpoint folder (no {STATE_FILE}); pass 'latest' or a step-N folder"
        )
    return path


def trainable_state_dict(model: Any) -> dict[str, Any]:
    """Trainable parameters only, by their names in the unwrapped model (tied weights appear once)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def install_hooks(accelerator: Any) -> None:
    """Make ``save_state``/``load_state`` store and check only the trainable weights.

    Names are the unwrapped model's, so a checkpoint does not depend on the DDP wrapper. Under FSDP the
    model is not Accelerate's: these hooks see no weights, and train/sharding.py writes the same file.
    """
    import torch
    from safetensors.torch import load_file

    def save_hook(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
        for i in range(len(weights)):
            weights[i] = trainable_state_dict(accelerator.unwrap_model(models[i]))

    def load_hook(models: list[Any], input_dir: str) -> None:
        for i, model in enumerate(models):
            path = Path(input_dir) / (WEIGHTS_FILE if i == 0 else WEIGHTS_FILE.replace(".", f"_{i}."))
            saved = load_file(str(path))
            params = dict(accelerator.unwrap_model(model).named_parameters())
            trainable = {n for n, p in params.items() if p.requires_grad}
            if set(saved) != trainable:
                raise UserError(
                    f"checkpoint '{input_dir}' holds {len(saved)} trainable tensors but this run trains "
                    f"{len(trainable)}: it was written with another --mode or model; resume with the same settings"
                )
            with torch.no_grad():
                for name, tensor in saved.items():
                    params[name].copy_(tensor)
        models.clear()  # loaded here; Accelerate must not load them again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save(accelerator: Any, run_dir: Path, state: TrainState, fingerprint: dict[str, Any], keep: int,
         sharded: tuple[Any, Any] | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp folder, then rename) and keep the newest ``keep``.

    ``sharded``: (model, optimizer) under FSDP, which Accelerate does not hold; their whole states are
    gathered into the same files an unsharded run writes (train/sharding.py).
    """
    folder = checkpoints_dir(run_dir)
    tmp, final = folder / f".tmp-step-{state.step}", folder / f"step-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)  # every process writes its own RNG file
    if sharded is not None:
        from florence_kit.train.sharding import save_sharded

        save_sharded(*sharded, tmp, WEIGHTS_FILE)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state.to_json(fingerprint))
        _fsync_tree(tmp)
        if final.exists():  # the same step written before a resume from an older checkpoint
            shutil.rmtree(final)
        os.rename(tmp, final)
        rotate(run_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename makes them the checkpoint (a power cut must not tear them)."""
    for path in folder.iterdir():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def rotate(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted saves."""
    folder = checkpoints_dir(run_dir)
    for stale in folder.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[: -max(keep, 1)]:
        shutil.rmtree(old)


def check_settings(path: Path, fingerprint: dict[str, Any]) -> TrainState:
    """The checkpoint's state, or one line naming the settings that differ from the run that wrote it.

    Called before the run folder is touched (so a refused resume leaves config.yaml and metrics.jsonl as they
    were) and again when the state is loaded."""
    state, saved = TrainState.from_file(path / STATE_FILE)
    # a key the checkpoint lacks was added to the fingerprint after it was written: not a difference
    changed = [f"{k}: {saved[k]!r} → {v!r}" for k, v in fingerprint.items() if k in saved and not _same(k, saved[k], v)]
    if changed:
        raise UserError(
            f"cannot resume from '{path}': these settings differ from the run that wrote it ({'; '.join(changed)}); "
            "resume with the same settings"
        )
    return state


def load(accelerator: Any, path: Path, fingerprint: dict[str, Any], sharded: tuple[Any, Any] | None = None
         ) -> TrainState:
    """Restore model, optimizer, scheduler, scaler and RNG from ``path``; refuse a checkpoint of another setup.

    ``sharded``: (model, optimizer) under FSDP, loaded here (each process takes its shard), not by Accelerate.
    """
    state = check_settings(path, fingerprint)
    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if not rng.is_file():  # Accelerate would skip a missing RNG file silently and the run would not be exact
        raise UserError(f"checkpoint '{path}' lacks {rng.name}; it is incomplete")
    accelerator.load_state(str(path))
    if sharded is not None:
        from florence_kit.train.sharding import load_sharded

        load_sharded(*sharded, path, WEIGHTS_FILE)
    return state


def fit_of_checkpoint(cfg: Any, checkpoint: Path, print_fn: Any = print) -> Any:
    """``--fit auto --resume``: ``cfg`` with the micro-batch, accumulation and checkpointing the run chose.

    Re-deciding would depend on the memory free now (on CPU) and could pick another split of the same
    effective batch, which the resume fingerprint then refuses. None when the checkpoint does not record a
    split of the requested effective batch (another effective batch is refused by the fingerprint as it is).
    """
    import json
    from dataclasses import replace

    from florence_kit.train.runfolder import RunFolder

    saved = json.loads((checkpoint / STATE_FILE).read_text()).get("fingerprint", {})
    micro, accum = saved.get("batch_size"), saved.get("grad_accum")
    if not micro or not accum or micro * accum != cfg.batch_size * cfg.grad_accum:
        return None
    ckpt = RunFolder.of_checkpoint(checkpoint).config().get("gradient_checkpointing")
    ckpt = cfg.gradient_checkpointing if ckpt is None else bool(ckpt)
    chosen = replace(cfg, batch_size=micro, grad_accum=accum, gradient_checkpointing=ckpt)
    print_fn(
        f"fit auto: resuming, so batch {micro} × accumulation {accum}"
        f"{' + gradient checkpointing' if ckpt else ''} as the run chose (not re-decided for the memory free now)"
    )
    return chosen

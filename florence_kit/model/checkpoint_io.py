"""Load Florence-2 (native transformers classes, no remote code) and its processor.

``--model`` takes a local folder, a hub id, or a short name (``base``, ``large``, ``base-ft``,
``large-ft``). Microsoft's original ``microsoft/Florence-2-*`` repos need remote code; they are
mapped to their native twins under ``florence-community/`` with a one-line notice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from florence_kit.common.errors import UserError, first_line

NATIVE_ORG = "florence-community"
SHORT_NAMES = {
    "base": f"{NATIVE_ORG}/Florence-2-base",
    "large": f"{NATIVE_ORG}/Florence-2-large",
    "base-ft": f"{NATIVE_ORG}/Florence-2-base-ft",
    "large-ft": f"{NATIVE_ORG}/Florence-2-large-ft",
}
MICROSOFT_PREFIX = "microsoft/Florence-2-"


def resolve_model_id(name: str) -> tuple[str, str | None]:
    """(what to load, an optional notice for the user)."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name], None
    if name.startswith(MICROSOFT_PREFIX):
        native = f"{NATIVE_ORG}/Florence-2-{name[len(MICROSOFT_PREFIX):]}"
        return native, f"'{name}' needs remote code; using its native twin '{native}'"
    return name, None


def check_local_checkpoint(path: Path) -> None:
    """A folder must hold a native Florence-2 config and safetensors weights; say what it is otherwise."""
    check_local_config(path)
    if not any(path.glob("*.safetensors")) and not (path / "adapter_config.json").is_file():
        pickled = sorted(p.name for p in path.glob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        raise UserError(
            f"'{path}' has no safetensors weights"
            + (f" (only {', '.join(pickled)}, pickle files that can run code when loaded)" if pickled else "")
            + "; florence-kit loads weights only from safetensors: re-save the model with "
            "save_pretrained(..., safe_serialization=True)"
        )


def check_local_config(path: Path) -> None:
    """The folder's config.json must be a native Florence-2 one (Florence2Config would fill any other with defaults)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"'{path}' is not a Florence-2 checkpoint: no config.json in it")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"'{config_file}' is not valid JSON ({exc})") from None
    if "auto_map" in config or "dim_embed" in (config.get("vision_config") or {}):
        from florence_kit.model.convert import convert_command

        raise UserError(
            f"'{path}' is a Microsoft-format Florence-2 (remote code, trust_remote_code=True), which transformers "
            f"5 cannot load; convert it once: {convert_command(path)}"
        )
    model_type = config.get("model_type")
    if model_type != "florence2":
        raise UserError(f"'{path}' is not a Florence-2 checkpoint (model_type is '{model_type}', not 'florence2')")
    vision_type = (config.get("vision_config") or {}).get("model_type")
    if vision_type not in (None, "", "florence_vision"):
        raise UserError(
            f"'{path}' is a remote-code Florence-2 checkpoint (vision model_type '{vision_type}'); "
            "convert it to the native format or use the florence-community/ checkpoint"
        )
    if not vision_type:
        raise UserError(
            f"'{path}' has an empty vision_config.model_type (a known defect of checkpoints saved by other "
            "tools); set it to 'florence_vision' in config.json"
        )


def _hub_error(name: str, exc: Exception) -> UserError:
    first = first_line(exc)
    return UserError(
        f"could not load model '{name}' from the hub ({first}). If this machine is offline, pass a local "
        "checkpoint folder with --model DIR (or make one with `florence-kit make-tiny DIR`)"
    )


ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path: Path) -> bool:
    """A LoRA/QLoRA run folder: an adapter config and no model config of its own."""
    return (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file()


def locate(name: str) -> str:
    """What ``name`` (a folder, hub id or short name) loads from: a checked local folder or a hub id.

    Prints the one-line notice of :func:`resolve_model_id`; an adapter folder is returned unchecked
    (it has no config.json of its own).
    """
    model_id, notice = resolve_model_id(name)
    if notice:
        from rich.console import Console

        Console(stderr=True).print(f"[yellow]note:[/] {notice}")
    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model '{path}' is a file; pass the checkpoint folder")
        if not is_adapter_dir(path):
            check_local_checkpoint(path)
        return str(path)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise UserError(f"model folder '{model_id}' does not exist")
    return model_id


def load_native(model_id: str, name: str, *, dtype: Any = None, quantization_config: Any = None) -> tuple[Any, Any]:
    """(model, processor) of a native checkpoint: a checked local folder or a hub id; errors are one line.

    ``name`` is what the user typed (for the messages); :func:`florence_kit.model.loading.load_model` is the
    entry that decides what kind of folder ``name`` is.
    """
    from safetensors import SafetensorError
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    path = Path(model_id)
    try:
        model = Florence2ForConditionalGeneration.from_pretrained(
            model_id, dtype=dtype, quantization_config=quantization_config, use_safetensors=True
        )
        processor = AutoProcessor.from_pretrained(model_id)
    except UserError:
        raise
    except OSError as exc:
        raise (_incomplete_error(path, exc) if path.is_dir() else _hub_error(name, exc)) from None
    except SafetensorError as exc:
        raise _incomplete_error(path, exc) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"'{name}' could not be loaded as Florence-2: {type(exc).__name__}: {exc}") from None
    return model, processor


def _incomplete_error(path: Path, exc: Exception) -> UserError:
    """A local folder that fails to load is a truncated or partial copy: not a hub or network problem."""
    first = first_line(exc)
    return UserError(
        f"'{path}' is incomplete or damaged ({type(exc).__name__}: {first}); it may be a copy or save that "
        "did not finish: copy or save the checkpoint again"
    )


def clean_generation_config(model: Any, processor: Any) -> None:
    """Make the saved generation config plain greedy with the tokenizer's own special ids.

    Checkpoints from other tools ship ``no_repeat_ngram_size=3``/beam search or swapped special ids;
    what we save must reload and decode the same way everywhere.
    """
    from transformers import GenerationConfig

    tok = processor.tokenizer
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        decoder_start_token_id=model.config.text_config.decoder_start_token_id,
        # a property of how the model was trained, not a decoding preference: Microsoft-trained models
        # (converted by `florence-kit convert`) start every answer with <s>, and the padded vocabulary
        # rows a conversion adds have no logits in the original
        forced_bos_token_id=model.generation_config.forced_bos_token_id,
        suppress_tokens=model.generation_config.suppress_tokens,
        forced_eos_token_id=None,
    )


def save_checkpoint(model: Any, processor: Any, out_dir: Path) -> Path:
    """``save_pretrained`` model (safetensors) + processor, loadable with ``from_pretrained``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_generation_config(model, processor)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir

"""Shipping a run: ``export --merge`` turns a LoRA/QLoRA run folder into a plain checkpoint.

The merged folder loads with ``Florence2ForConditionalGeneration.from_pretrained`` and needs neither peft
nor bitsandbytes; a qlora adapter is merged into its base loaded in full precision.
"""

from __future__ import annotations

from pathlib import Path

from florence_kit.common.errors import UserError
from florence_kit.model.adapters import load_adapter_model
from florence_kit.model.checkpoint_io import ADAPTER_CONFIG, save_checkpoint
from florence_kit.train.config import check_output_dir


def merge_adapter(run_dir: Path, out: Path, overwrite: bool = False) -> Path:
    """Base + adapter of ``run_dir`` merged and saved to ``out`` (safetensors + processor)."""
    if not (run_dir / ADAPTER_CONFIG).is_file():
        if (run_dir / "config.json").is_file():
            raise UserError(f"'{run_dir}' is already a plain checkpoint (a full/frozen-encoder run): nothing to merge")
        raise UserError(f"'{run_dir}' is not a lora/qlora run folder: no {ADAPTER_CONFIG} in it")
    if out.resolve() == run_dir.resolve():
        raise UserError("--merge must be a different folder from RUN_DIR (the adapter would be overwritten)")
    check_output_dir(out, overwrite)
    model, processor = load_adapter_model(run_dir, merge=True)
    return save_checkpoint(model, processor, out)

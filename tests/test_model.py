"""Model names, checkpoint checks, and the tiny model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from florence_kit.common.errors import UserError
from florence_kit.model.checkpoint_io import check_local_checkpoint, resolve_model_id
from florence_kit.model.loading import load_model


@pytest.mark.parametrize(
    ("name", "expected", "noticed"),
    [
        ("base", "florence-community/Florence-2-base", False),
        ("large-ft", "florence-community/Florence-2-large-ft", False),
        ("microsoft/Florence-2-base-ft", "florence-community/Florence-2-base-ft", True),
        ("someone/my-florence", "someone/my-florence", False),
    ],
)
def test_model_names_resolve_to_native_checkpoints(name: str, expected: str, noticed: bool) -> None:
    resolved, notice = resolve_model_id(name)
    assert resolved == expected and bool(notice) == noticed


def test_a_checkpoint_with_an_empty_vision_model_type_is_named(tiny_dir: Path, tmp_path: Path) -> None:
    config = json.loads((tiny_dir / "config.json").read_text())
    config["vision_config"]["model_type"] = ""
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="empty vision_config.model_type"):
        check_local_checkpoint(tmp_path)
    with pytest.raises(UserError, match="no config.json"):
        check_local_checkpoint(tmp_path / "nothing")


def test_tiny_tokenizer_has_image_and_location_tokens(tiny_dir: Path) -> None:
    model, processor = load_model(str(tiny_dir))
    tok = processor.tokenizer
    assert tok.image_token == "<image>" and tok.image_token_id == model.config.image_token_id
    for text in ("<loc_0>", "<loc_999>"):
        assert len(tok(text, add_special_tokens=False)["input_ids"]) == 1
    assert tok.decode(tok("<loc_17>42", add_special_tokens=False)["input_ids"]) == "<loc_17>42"
    assert tok("47", add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(c) for c in "47"]
    side = processor.image_processor.size["height"]
    assert processor.num_image_tokens == (side // 32) ** 2 + 1  # 17 at 128 px


@pytest.mark.parametrize("damage", ["weights cut short", "weights cut in the header", "no processor files"])
def test_a_partially_written_folder_is_one_clear_error(tiny_dir: Path, tmp_path: Path, damage: str) -> None:
    """A copy or save that did not finish: named as such, not a traceback and not a hub/offline hint."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    weights = folder / "model.safetensors"
    if damage == "no processor files":
        for name in ("processor_config.json", "tokenizer.json", "tokenizer_config.json"):
            (folder / name).unlink()
    else:
        size = weights.stat().st_size * 9 // 10 if damage == "weights cut short" else 1000
        with weights.open("r+b") as handle:
            handle.truncate(size)
    with pytest.raises(UserError, match="incomplete or damaged") as error:
        load_model(str(folder))
    assert "hub" not in str(error.value)

"""The modes table is what every reader of ``--mode`` sees: the planner's arithmetic, the real model, train/'s views."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from florence_kit.common.errors import UserError
from florence_kit.model import memory
from florence_kit.model.adapters import AdapterOptions, check_adapter_options, wrap_lora
from florence_kit.model.loading import load_model
from florence_kit.model.modes import ADAPTER_MODES, TABLE, Mode, TrainingMode, apply_mode, trainable_counts
from florence_kit.train.config import TrainConfig
from florence_kit.train.recipe import view


@pytest.mark.parametrize("lora_vision", [False, True], ids=["", "lora-vision"])
@pytest.mark.parametrize("name", list(TABLE))
def test_memory_counts_what_the_mode_trains_on_the_model(tiny_dir, name, lora_vision):
    """memory.trainable (from the row's settings and the meta-device sizes) equals the parameters that get
    requires_grad on the real tiny model with the row applied (PEFT-wrapped where the row has adapters)."""
    row = TABLE[name]
    model, _ = load_model(str(tiny_dir))
    sizes = memory.sizes(model.config)
    if row.adapters:  # a 4-bit base trains the same tensors as a full-precision one: wrapped unquantised here
        model = wrap_lora(model, 4, 8, 0.0, lora_vision=lora_vision)
    apply_mode(model, name, lora_vision)
    counted = sum(trained for trained, _ in trainable_counts(model).values())
    assert memory.trainable(sizes, name, lora_r=4, lora_vision=lora_vision) == counted > 0
    frozen_vision = trainable_counts(model)["vision"][0] == 0
    assert frozen_vision == (row.plan(lora_vision)["vision"] == "frozen")


def test_every_list_of_modes_is_the_table():
    assert [m.value for m in Mode] == list(memory.MODES) == list(TABLE)
    assert ADAPTER_MODES == tuple(n for n, r in TABLE.items() if "lora" in r.plan().values()) == ("lora", "qlora")
    assert [n for n in TABLE if memory.default_optim(n) == "adamw8bit"] == ["qlora"]
    with pytest.raises(ValueError, match="unknown mode"):
        memory.estimate(memory.sizes(memory.load_config("tiny")), memory.Setting("half"), memory.Shape(64))


def test_a_row_outside_what_the_code_implements_is_refused_at_once():
    for bad in (dict(language="frozen"), dict(projector="lora"), dict(vision="lora")):  # no code or coefficients
        with pytest.raises(ValueError, match="settings must be among"):
            TrainingMode("new", **{"vision": "full", "projector": "full", "language": "full", "lr": 1e-5, **bad})
    with pytest.raises(ValueError, match="quant_bits must be among"):
        TrainingMode("q8", vision="frozen", projector="full", language="lora", lr=1e-4, quant_bits=8)
    with pytest.raises(ValueError, match="quantised weights get no gradients"):  # 4-bit weights cannot train
        TrainingMode("q-full", vision="frozen", projector="full", language="full", lr=1e-5, quant_bits=4)
    with pytest.raises(ValueError, match="saves the adapter and the projector's copy only"):
        TrainingMode("lora-vision-full", vision="full", projector="full", language="lora", lr=1e-4)
    # what the code implements is a row: LoRA with 8-bit AdamW by default
    row = TrainingMode("lora-8bit", vision="frozen", projector="full", language="lora", lr=1e-4, optim_8bit=True)
    assert row.adapters and row.plan(lora_vision=True)["vision"] == "lora"


@pytest.mark.parametrize("cls", [memory.FitRequest, AdapterOptions])
def test_model_views_are_train_config_fields_of_the_same_name_and_type(cls, tmp_path):
    """model/ reads these views, never TrainConfig; train/ fills them by field name, so each field must be one of
    TrainConfig's with the same type, and the view carries the config's values."""
    config_types = typing.get_type_hints(TrainConfig)
    view_types = typing.get_type_hints(cls)
    assert view_types and all(config_types.get(name) == kind for name, kind in view_types.items()), view_types
    cfg = TrainConfig(task="docvqa", model="m", output_dir=tmp_path, mode="qlora", batch_size=3, lora_r=5,
                      lora_vision=True)
    built = view(cls, cfg)
    assert dataclasses.asdict(built) == {name: getattr(cfg, name) for name in view_types}


def test_adapter_checks_read_the_view():
    base = AdapterOptions(mode="lora", lora_r=4, lora_dropout=0.0, lora_vision=True, optim=None)
    assert check_adapter_options(base) == "adamw"
    for bad, message in ((dict(mode="full"), "--lora-vision needs --mode lora or qlora"),
                         (dict(lora_r=0), "--lora-r must be at least 1"),
                         (dict(lora_dropout=1.0), r"--lora-dropout must be in \[0, 1\)"),
                         (dict(optim="sgd"), "--optim must be one of")):
        with pytest.raises(UserError, match=message):
            check_adapter_options(dataclasses.replace(base, **bad))

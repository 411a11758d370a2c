"""Answers stop at the decoder's position table: the serve page (and every caller of the one generation engine).

The model has 80 positions and never emits </s> (suppressed), so every answer runs to its cap; without the cap,
the page's 256-token region answers would index past the table (torch's IndexError).
"""

from __future__ import annotations

import pytest

POSITIONS = 80  # room for <OD>'s expanded prompt (70 tokens with the image's) but not for 256 new tokens


@pytest.fixture(scope="module")
def endless(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    import torch
    from transformers import Florence2ForConditionalGeneration, GenerationConfig

    from florence_kit.model.tiny import build_processor, reinit_default, tiny_config

    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(tiny_config(max_position_embeddings=POSITIONS))
    reinit_default(model)
    model.generation_config = GenerationConfig(bos_token_id=0, pad_token_id=1, eos_token_id=2,
                                               decoder_start_token_id=2, suppress_tokens=[2])
    return model.eval(), build_processor()


def test_serve_page_caps_region_answers_at_the_table(endless, capsys) -> None:
    from PIL import Image

    from florence_kit.evaluate.generation import generation_config, position_limit
    from florence_kit.present.serve import Predictor

    model, processor = endless
    assert position_limit(model) == POSITIONS
    page = Predictor(model, processor, tasks={}, region_max_tokens=256)
    answer = page(Image.new("RGB", (128, 128), "white"), "<OD>", "")
    assert answer.text is not None
    assert f"answers are capped at {POSITIONS} new tokens" in capsys.readouterr().err
    assert generation_config(model, processor, {"max_new_tokens": 256}).max_new_tokens == POSITIONS
    # the note is printed once per model, not once per answer
    page(Image.new("RGB", (128, 128), "black"), "<OD>", "")
    assert "capped" not in capsys.readouterr().err


def test_an_answer_of_exactly_the_table_fits(endless) -> None:
    """The start token takes position 0 and the last token is never read back: POSITIONS new tokens fit."""
    from PIL import Image

    from florence_kit.evaluate.generation import encode, generation_config

    model, processor = endless
    inputs = encode(processor, [Image.new("RGB", (128, 128))], ["<OCR>"])
    out = model.generate(**inputs, generation_config=generation_config(model, processor,
                                                                       {"max_new_tokens": POSITIONS}))
    assert out.shape[1] == 1 + POSITIONS
    with pytest.raises(IndexError):  # one more reads past the table: what the cap prevents
        model.generate(**inputs, max_new_tokens=POSITIONS + 1, min_new_tokens=POSITIONS + 1,
                       decoder_start_token_id=2, eos_token_id=2, pad_token_id=1)


def test_a_prompt_past_the_encoder_table_is_refused(endless) -> None:
    from PIL import Image

    from florence_kit.common.errors import UserError
    from florence_kit.evaluate.generation import generate, generation_config

    model, processor = endless
    with pytest.raises(UserError, match=f"more than the {POSITIONS} positions this model's encoder has"):
        generate(model, processor, [Image.new("RGB", (128, 128))], ["<DocVQA>" + "why " * 40],
                 generation_config(model, processor, {}))


def test_typed_max_new_tokens_past_the_table_is_refused(endless, docvqa_task) -> None:
    from florence_kit.common.errors import UserError
    from florence_kit.evaluate.generation import generation_config_for

    model, processor = endless
    assert generation_config_for(docvqa_task, model, processor, max_new_tokens=POSITIONS).max_new_tokens == POSITIONS
    with pytest.raises(UserError, match=f"--max-new-tokens {POSITIONS + 1} is more than this model can generate"):
        generation_config_for(docvqa_task, model, processor, max_new_tokens=POSITIONS + 1)

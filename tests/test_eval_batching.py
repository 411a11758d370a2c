"""Batched, length-sorted evaluation gives exactly the answers of one-at-a-time generation.

The model is the tiny random Florence-2 with its cross-attention output scaled up 3x, so that answers
depend on each example's image and prompt (the plain random model answers nearly the same for every
input, which would let a wrong batching pass). Prompts range from 2 to ~60 words so batches carry a
lot of padding. A deliberately left-padded batch is checked to give *different* answers: the equality
tests can fail.
"""

from __future__ import annotations

import pytest

QUESTIONS = [
    "total?",
    "What is the date written at the top of the invoice, just under the sender's address?",
    "amount",
    "Which company sent this letter, and what is the zip code printed in the sender block on the top left "
    "corner of the first page of the document, next to the logo and the telephone number of the office?",
    "name of the person who signed",
    "a",
    "What is the reference number?",
    "How many items are listed in the table in the middle of the page, counting every row with a price?",
]


@pytest.fixture(scope="module")
def model_and_processor(one_thread):
    import torch

    from florence_kit.model.tiny import make_tiny

    model, processor = make_tiny(seed=0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "encoder_attn.out_proj" in name:
                param.mul_(3.0)
    return model, processor


@pytest.fixture(scope="module")
def varied_split(docvqa_splits):
    """The synthetic validation split with questions of very different lengths."""
    split = docvqa_splits["validation"]
    return split.map(lambda row, i: {"question": QUESTIONS[i % len(QUESTIONS)]}, with_indices=True)


def _one_at_a_time(model, processor, task, split, **overrides):
    from florence_kit.data.dataset import TaskDataset
    from florence_kit.evaluate.generation import generate, generation_config_for

    config = generation_config_for(task, model, processor, **{"max_new_tokens": 8, **overrides})
    dataset = TaskDataset(split, task, with_target=False)
    examples = [dataset[i] for i in range(len(dataset))]
    return [generate(model, processor, [ex.image], [ex.prompt], config)[0] for ex in examples], examples


def test_one_question_per_page_is_ordered_longest_first_and_stable(model_and_processor):
    from florence_kit.evaluate.generation import page_order, prompt_lengths

    _, processor = model_and_processor
    prompts = ["<DocVQA>a", "<DocVQA>a much longer question", "<DocVQA>b", "<DocVQA>medium one"]
    assert page_order(["p0", "p1", "p2", "p3"], prompt_lengths(processor, prompts)) == [1, 3, 0, 2]
    assert page_order([], prompt_lengths(processor, [])) == []


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_eval_equals_one_at_a_time(model_and_processor, docvqa_task, varied_split, num_beams):
    from florence_kit.evaluate.scoring import answer_and_score, thumbnail_jpeg

    model, processor = model_and_processor
    single, examples = _one_at_a_time(model, processor, docvqa_task, varied_split, num_beams=num_beams)
    assert len(set(single)) >= 3, single  # answers depend on the input: a batching bug would show
    result = answer_and_score(model, processor, docvqa_task, varied_split, batch_size=5, num_beams=num_beams,
                      max_new_tokens=8, show_progress=False)
    assert [rec["prediction"] for rec in result.predictions] == single
    # dataset order is kept although batches were formed longest-first
    assert [rec["id"] for rec in result.predictions] == [ex.id for ex in examples]
    assert [rec["prompt"] for rec in result.predictions] == [ex.prompt for ex in examples]
    assert result.thumbnails == [thumbnail_jpeg(ex.image) for ex in examples]


def test_left_padding_would_change_answers_and_is_overridden(model_and_processor, docvqa_task, varied_split):
    """Left padding shifts BART's absolute positions: answers change. answer_and_score() pads right regardless."""
    import torch

    from florence_kit.evaluate.generation import generation_config_for
    from florence_kit.evaluate.scoring import answer_and_score

    model, processor = model_and_processor
    single, examples = _one_at_a_time(model, processor, docvqa_task, varied_split)
    config = generation_config_for(docvqa_task, model, processor, max_new_tokens=8)
    inputs = processor(images=[ex.image for ex in examples], text=[ex.prompt for ex in examples],
                       return_tensors="pt", padding="longest", padding_side="left")
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=config)
    left = [text.strip() for text in processor.batch_decode(out, skip_special_tokens=True)]
    assert sum(a != b for a, b in zip(left, single, strict=True)) >= 2

    processor.tokenizer.padding_side = "left"  # as some saved tokenizers are configured
    try:
        result = answer_and_score(model, processor, docvqa_task, varied_split, batch_size=8, max_new_tokens=8,
                          show_progress=False, thumbnail_size=None)
    finally:
        processor.tokenizer.padding_side = "right"
    assert [rec["prediction"] for rec in result.predictions] == single
    assert result.thumbnails == []


def test_unsorted_and_worker_loading_give_the_same_records(model_and_processor, docvqa_task, varied_split):
    from florence_kit.evaluate.scoring import answer_and_score

    model, processor = model_and_processor
    common = {"max_new_tokens": 8, "show_progress": False, "thumbnail_size": 64}
    sorted_ = answer_and_score(model, processor, docvqa_task, varied_split, batch_size=3, **common)
    unsorted = answer_and_score(model, processor, docvqa_task, varied_split, batch_size=3, sort_by_length=False,
                        num_workers=1, **common)
    assert sorted_.predictions == unsorted.predictions
    assert sorted_.thumbnails == unsorted.thumbnails
    assert sorted_.metrics == unsorted.metrics


def test_bad_batch_size_is_a_user_error(model_and_processor, docvqa_task, varied_split):
    from florence_kit.common.errors import UserError
    from florence_kit.evaluate.scoring import answer_and_score

    model, processor = model_and_processor
    with pytest.raises(UserError, match="--batch-size"):
        answer_and_score(model, processor, docvqa_task, varied_split, batch_size=0, show_progress=False)
    with pytest.raises(UserError, match="--num-workers"):
        answer_and_score(model, processor, docvqa_task, varied_split, num_workers=-1, show_progress=False)


def test_cli_eval_with_beams_and_workers_keeps_dataset_order(tiny_dir, docvqa_dir, docvqa_task, tmp_path, one_thread):
    import json

    import datasets
    from typer.testing import CliRunner

    from florence_kit.cli import app
    from florence_kit.model.loading import load_model

    out = tmp_path / "eval"
    args = ["eval", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--output-dir", str(out),
            "--batch-size", "3", "--num-beams", "2", "--max-new-tokens", "6", "--num-workers", "1", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    split = datasets.load_from_disk(str(docvqa_dir))["validation"]
    assert [p["id"] for p in preds] == [str(i) for i in split["questionId"]]
    model, processor = load_model(str(tiny_dir))
    single, _ = _one_at_a_time(model, processor, docvqa_task, split, num_beams=2, max_new_tokens=6)
    assert [p["prediction"] for p in preds] == single

    bad = CliRunner().invoke(app, [*args[:-9], "--batch-size", "0", "--quiet"])
    assert bad.exit_code == 2 and "--batch-size must be at least 1" in bad.output


def test_pages_are_decoded_and_seen_by_the_vision_tower_once(model_and_processor, docvqa_task, varied_split,
                                                            monkeypatch):
    """eval's default batches whole pages: each page decoded and through DaViT once, the same records as --speed off."""
    import torch

    from florence_kit.data.dataset import TaskDataset
    from florence_kit.evaluate.generation import encode, encode_pages
    from florence_kit.evaluate.scoring import answer_and_score

    model, processor = model_and_processor
    pages = len(set(varied_split["docId"]))
    assert pages < varied_split.num_rows  # several questions per page
    counts = {"decoded": 0, "tower": 0}
    getitem, tower = TaskDataset.__getitem__, model.model.vision_tower.forward

    def counting_getitem(self, index):
        counts["decoded"] += 1
        return getitem(self, index)

    def counting_tower(pixel_values, *a, **kw):
        counts["tower"] += pixel_values.shape[0]
        return tower(pixel_values, *a, **kw)

    monkeypatch.setattr(TaskDataset, "__getitem__", counting_getitem)
    monkeypatch.setattr(model.model.vision_tower, "forward", counting_tower)
    common = {"max_new_tokens": 8, "show_progress": False, "thumbnail_size": 64, "batch_size": 4}
    fast = answer_and_score(model, processor, docvqa_task, varied_split, **common)
    assert counts == {"decoded": pages, "tower": pages}  # batches of 4 = two whole pages of 2 questions
    counts.update(decoded=0, tower=0)
    plain = answer_and_score(model, processor, docvqa_task, varied_split, by_page=False, **common)
    assert counts == {"decoded": varied_split.num_rows, "tower": varied_split.num_rows}
    assert fast.predictions == plain.predictions and fast.thumbnails == plain.thumbnails
    assert fast.metrics == plain.metrics
    # the inputs themselves: the same ids and mask as the processor's, the distinct pages' pixels
    dataset = TaskDataset(varied_split, docvqa_task, with_target=False)
    examples = [dataset[i] for i in range(3)]
    which = [0, 0, 1]
    ref = encode(processor, [examples[i].image for i in which], [ex.prompt for ex in examples])
    mine = encode_pages(processor, [examples[0].image, examples[1].image], [ex.prompt for ex in examples], which)
    assert torch.equal(mine["input_ids"], ref["input_ids"]) and torch.equal(mine["attention_mask"],
                                                                           ref["attention_mask"])
    assert torch.equal(mine["pixel_values"][mine["image_index"]], ref["pixel_values"])

"""The reference fine-tuning loop: the behaviour of Hugging Face's "Fine-tuning Florence-2" blog (June 2024).

This is the baseline florence-kit is measured against (``python -m benchmarks.train_speed``): a plain PyTorch
loop that makes the blog's documented choices on transformers 5's native ``Florence2ForConditionalGeneration``
(no ``trust_remote_code``; the vision tower lives at ``model.model.vision_tower``). Everything that makes
the blog's loop slow or subtly wrong is kept on purpose, because that *is* the reference:

* the processor is called per batch inside the training loop (``collate_fn``), so every image is decoded
  and resized again every epoch, with ``num_workers=0``;
* labels are the padded answer ids, **not** masked to -100: the model is trained to predict ``<pad>``;
* the "frozen" encoder sets ``param.is_trainable = False``, an attribute PyTorch ignores: the vision
  tower still gets gradients and optimizer updates;
* ``AdamW(model.parameters(), lr=1e-6)`` and a linear schedule without warmup from ``get_scheduler``.

The blog's per-epoch validation pass is left out: the benchmark measures training throughput only.
``step_hook`` (not in the blog) lets the benchmark time data vs compute without changing the loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, Dataset


class DocVQADataset(Dataset):
    """The blog's dataset: ``<DocVQA>`` + question, the first answer, and the image converted to RGB."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> tuple[str, str, Any]:
        example = self.data[idx]
        question = "<DocVQA>" + example["question"]
        first_answer = example["answers"][0]
        image = example["image"]
        if image.mode != "RGB":
            image = image.convert("RGB")
        return question, first_answer, image


def make_collate_fn(processor: Any, device: str = "cpu") -> Callable[[list[tuple[str, str, Any]]], Any]:
    """The blog's ``collate_fn``: the processor runs here, on every batch of every epoch."""

    def collate_fn(batch: list[tuple[str, str, Any]]) -> tuple[Any, tuple[str, ...]]:
        questions, answers, images = zip(*batch, strict=True)
        inputs = processor(text=list(questions), images=list(images), return_tensors="pt", padding=True).to(device)
        return inputs, answers

    return collate_fn


def freeze_vision_tower_like_the_blog(model: Any) -> None:
    """The blog's freezing: ``is_trainable`` is not a PyTorch attribute, so this is a no-op."""
    for param in model.model.vision_tower.parameters():
        param.is_trainable = False


def train_model(
    train_data: Any,
    model: Any,
    processor: Any,
    *,
    epochs: int = 10,
    lr: float = 1e-6,
    batch_size: int = 6,
    device: str = "cpu",
    max_steps: int | None = None,
    shuffle: bool = True,
    step_hook: Callable[[str, int, float], None] | None = None,
) -> list[float]:
    """The blog's ``train_model`` (training half); returns the loss of every step.

    ``max_steps`` stops early (the benchmark runs a few steps); ``step_hook(event, step, loss)`` is called
    with ``"batch"`` when a batch arrives and ``"step"`` after ``optimizer.zero_grad()``.
    """
    import torch
    from transformers import get_scheduler

    train_loader = DataLoader(
        DocVQADataset(train_data), batch_size=batch_size, collate_fn=make_collate_fn(processor, device),
        shuffle=shuffle, num_workers=0,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    num_training_steps = epochs * len(train_loader)
    lr_scheduler = get_scheduler(
        name="linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=num_training_steps
    )
    losses: list[float] = []
    hook = step_hook or (lambda event, step, loss: None)
    for _epoch in range(epochs):
        model.train()
        for batch in train_loader:
            hook("batch", len(losses), float("nan"))
            inputs, answers = batch
            input_ids = inputs["input_ids"]
            pixel_values = inputs["pixel_values"]
            labels = processor.tokenizer(
                text=answers, return_tensors="pt", padding=True, return_token_type_ids=False
            ).input_ids.to(device)
            outputs = model(input_ids=input_ids, pixel_values=pixel_values, labels=labels)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            hook("step", len(losses), losses[-1])
            if max_steps is not None and len(losses) >= max_steps:
                return losses
    return losses


def main() -> None:  # pragma: no cover - a manual smoke run: python -m benchmarks.reference_loop MODEL DATA
    import sys

    import datasets
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model_dir, data_dir = sys.argv[1], sys.argv[2]
    model = Florence2ForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    freeze_vision_tower_like_the_blog(model)
    start = time.perf_counter()
    losses = train_model(datasets.load_from_disk(data_dir)["train"], model, processor, epochs=1, max_steps=5)
    print(f"{len(losses)} steps in {time.perf_counter() - start:.1f}s, losses {[round(x, 3) for x in losses]}")


if __name__ == "__main__":
    main()

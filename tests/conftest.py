"""Shared offline fixtures: a tiny random Florence-2 folder and a small rendered DocVQA dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from florence_kit.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def docvqa_splits():
    from florence_kit.synthetic import demo_splits

    return demo_splits(seed=0, n_train_docs=12, n_eval_docs=4, n_fields=2)


@pytest.fixture(scope="session")
def docvqa_dir(tmp_path_factory: pytest.TempPathFactory, docvqa_splits) -> Path:
    out = tmp_path_factory.mktemp("docvqa") / "data"
    docvqa_splits.save_to_disk(str(out))
    return out


@pytest.fixture()
def docvqa_task():
    from florence_kit.registry import get_task

    return get_task("docvqa")

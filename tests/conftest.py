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
    from florence_kit.model.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def docvqa_splits():
    from florence_kit.demo.synthetic_docvqa import demo_splits

    return demo_splits(seed=0, n_train_docs=12, n_eval_docs=4, n_fields=2)


@pytest.fixture(scope="session")
def docvqa_dir(tmp_path_factory: pytest.TempPathFactory, docvqa_splits) -> Path:
    out = tmp_path_factory.mktemp("docvqa") / "data"
    docvqa_splits.save_to_disk(str(out))
    return out


@pytest.fixture()
def docvqa_task():
    from florence_kit.tasks.registry import get_task

    return get_task("docvqa")


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """The bad-input catalogue's tally (tests/test_catalogue.py records each kind that behaved)."""
    tally = config.__dict__.get("bad_input_catalogue")
    if not tally:
        return
    from collections import Counter

    from test_catalogue import CASES

    kinds = len(CASES) + 1  # + Ctrl-C, a test of its own
    outcomes = Counter(tally.values())
    terminalreporter.write_sep("=", "bad-input catalogue")
    terminalreporter.write_line(
        f"bad-input catalogue: {kinds} kinds, {len(tally)} handled as specified ("
        + ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items())) + ")"
    )
    missing = [c.kind for c in CASES if c.kind not in tally]
    if missing:
        names = ", ".join(missing) if len(missing) <= 10 else f"{', '.join(missing[:10])}, ..."
        terminalreporter.write_line(f"{len(missing)} kind(s) failed or were not run: {names}")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than with threads fighting over a shared CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

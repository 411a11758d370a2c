"""The GPU MFU benchmark's CPU smoke path: the script a GPU runs also runs on the CPU with the tiny model."""

from __future__ import annotations

import json

import pytest

from benchmarks import train_mfu


def test_variant_flags_parse_and_unknown_ones_are_refused() -> None:
    assert train_mfu.parse_variant("eager") == set()
    assert train_mfu.parse_variant("compiled+tower+cudnn") == {"compiled", "tower", "cudnn"}
    assert train_mfu.parse_variant("compiled+autotune") == {"compiled", "autotune"}
    with pytest.raises(SystemExit, match="unknown variant flag"):
        train_mfu.parse_variant("compiled+turbo")


def test_smoke_run_counts_flops_and_writes_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train_mfu, "DEVICE", train_mfu.DEVICE)
    monkeypatch.setitem(train_mfu.SIZE, "model", train_mfu.SIZE["model"])
    monkeypatch.setitem(train_mfu.SIZE, "image", train_mfu.SIZE["image"])
    out = tmp_path / "mfu.json"
    train_mfu.main(["--smoke", "--variants", "eager,eager+mathred", "--batches", "1", "--steps", "1",
                    "--warmup", "0", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["what"] for r in rows] == ["model step, eager", "model step, eager+mathred"]
    assert all(r["flops_per_step"] > 1e8 and r["step_s"] > 0 for r in rows)
    assert rows[0]["flops_per_step"] == rows[1]["flops_per_step"]  # counted once per batch size


def test_backend_switches_are_put_back() -> None:
    import torch

    before = train_mfu.backend_state()
    train_mfu.apply_flags({"cudnn", "tf32", "mathred", "nocudnnsdp"})
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    train_mfu.restore_backend(before)
    assert train_mfu.backend_state() == before

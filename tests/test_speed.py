"""--speed auto: what the plain finetune command decides (store, feature cache, page grouping), and the switches."""

from __future__ import annotations

from pathlib import Path

import pytest

from florence_kit.common.errors import UserError
from florence_kit.train.config import TrainConfig
from florence_kit.train.speed import decide

MB = 10**6


def _decide(tmp_path: Path, free_mb: float = 1e6, frozen: bool = True, **kw):
    cfg = TrainConfig(task="docvqa", model="m", output_dir=tmp_path / "run", **kw)
    counted = []

    def pages() -> int:
        counted.append(1)
        return 10

    chosen, line, record = decide(cfg, frozen_vision=frozen, pages=pages, pixel_size=(100, 100),
                                  feature_page_bytes=MB // 10, free=lambda _p: free_mb * MB, device_of=lambda _p: 1)
    return chosen, line, record, counted


def switches(cfg) -> tuple[bool, bool, bool]:
    return cfg.prepare_data, cfg.cache_vision_features, cfg.group_by_image


def test_frozen_encoder_takes_store_cache_and_grouping(tmp_path):
    chosen, line, record, _ = _decide(tmp_path, mode="frozen-encoder")
    assert switches(chosen) == (True, True, True)
    assert line.startswith("speed auto: decode-once store + vision-feature cache + page grouping;")
    assert "10 pages at 100x100" in line and "300.0 kB" in line and str(tmp_path / "run" / "prepared") in line
    assert "1.0 MB in" in line and "vision_cache" in line  # the feature cache's size and place
    assert record == {"speed": "auto", "pages": 10, "store_bytes": 300_000, "feature_bytes": 1_000_000,
                      "decision": line}


def test_full_mode_takes_the_store_only(tmp_path):
    chosen, line, record, _ = _decide(tmp_path, frozen=False, mode="full")
    assert switches(chosen) == (True, False, False)
    assert "no feature cache: --mode full trains the vision tower" in line
    assert record["feature_bytes"] == 0


def test_streaming_keeps_the_plain_path_without_counting_pages(tmp_path):
    chosen, line, _, counted = _decide(tmp_path, mode="frozen-encoder", streaming=True)
    assert switches(chosen) == (False, False, False) and not counted
    assert line.startswith("speed auto: plain per-batch path;") and "streamed" in line


def test_no_room_on_disk_keeps_the_plain_path(tmp_path):
    # 0.5 MB free: the 0.3 MB store is more than half of it, and so is the 1 MB cache
    chosen, line, _, _ = _decide(tmp_path, free_mb=0.5, mode="frozen-encoder")
    assert switches(chosen) == (False, False, False)
    assert "no room for the decode-once store (300.0 kB is more than half the 500.0 kB free" in line
    assert "no room for the feature cache" in line
    # room for the store but not for store + cache on the same disk: the store alone
    chosen, line, _, _ = _decide(tmp_path, free_mb=1.0, mode="frozen-encoder")
    assert switches(chosen) == (True, False, False)


def test_off_switches(tmp_path):
    chosen, line, _, counted = _decide(tmp_path, mode="frozen-encoder", speed="off")
    assert switches(chosen) == (False, False, False) and not counted
    assert line == "speed off: plain per-batch path (--speed off)"
    chosen, line, _, _ = _decide(tmp_path, mode="frozen-encoder", group_by_image=False)
    assert switches(chosen) == (True, True, False) and "as typed: --no-group-by-image" in line
    chosen, _, _, _ = _decide(tmp_path, mode="frozen-encoder", cache_vision_features=False)
    assert switches(chosen) == (True, False, False)  # grouping pays only with the cache
    chosen, _, _, _ = _decide(tmp_path, mode="frozen-encoder", prepare_data=False)
    assert switches(chosen) == (False, True, True)
    # a typed flag wins over --speed off, and over a full disk
    chosen, _, _, _ = _decide(tmp_path, mode="frozen-encoder", speed="off", prepare_data=True)
    assert switches(chosen) == (True, False, False)
    chosen, _, _, _ = _decide(tmp_path, free_mb=0.01, mode="frozen-encoder", prepare_data=True)
    assert chosen.prepare_data is True
    with pytest.raises(UserError, match="--speed must be one of auto, off"):
        _decide(tmp_path, speed="fast")


def test_group_by_length_leaves_page_grouping_off(tmp_path):
    chosen, _, _, _ = _decide(tmp_path, mode="frozen-encoder", group_by_length=True)
    assert switches(chosen) == (True, True, False)


def test_resume_keeps_the_runs_choice(tmp_path):
    cfg = TrainConfig(task="docvqa", model="m", output_dir=tmp_path, mode="frozen-encoder")
    chosen, line, _ = decide(cfg, frozen_vision=True, pages=lambda: 1 / 0, pixel_size=(8, 8), feature_page_bytes=1,
                             resumed={"prepare_data": True, "cache_vision_features": False, "group_by_image": False})
    assert switches(chosen) == (True, False, False)
    assert line == "speed auto: resuming, so as the run chose: decode-once store (not re-decided)"


# ------------------------------------------------------------------------------- the command, end to end


def _finetune(tiny_dir, docvqa_dir, out, *extra):
    import json

    import yaml
    from typer.testing import CliRunner

    from florence_kit.cli import app

    every_step = out.parent / f"{out.name}-log.yaml"  # a loss per step in metrics.jsonl
    every_step.write_text("log_every: 1\n")
    args = ["finetune", "docvqa", "--model", str(tiny_dir), "--dataset", str(docvqa_dir), "--max-steps", "3",
            "--batch-size", "4", "--lr", "1e-3", "--config", str(every_step), "--quiet", "--output-dir", str(out),
            *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((out / "config.yaml").read_text())
    line = config["run"]["speed"]["decision"]  # the line printed (wrapped to the terminal's width)
    assert "".join(line.split()) in "".join(result.output.split())
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return line, config, losses


def test_plain_frozen_encoder_command_takes_the_fast_path_and_records_it(tiny_dir, docvqa_dir, tmp_path):
    line, config, losses = _finetune(tiny_dir, docvqa_dir, tmp_path / "auto", "--mode", "frozen-encoder")
    assert line.startswith("speed auto: decode-once store + vision-feature cache + page grouping;")
    assert "attention: sdpa (auto: " in line
    assert (config["prepare_data"], config["cache_vision_features"], config["group_by_image"]) == (True, True, True)
    assert config["speed"] == "auto" and config["attn"] == "auto"
    assert config["run"]["speed"]["attention"] == "sdpa"
    assert list((tmp_path / "auto" / "prepared").glob("pixels-*.u8"))  # the store is where the line says
    assert list((tmp_path / "auto" / "vision_cache").glob("*/*.npy"))
    # the same run as typing the three flags
    _, _, flagged = _finetune(tiny_dir, docvqa_dir, tmp_path / "flags", "--mode", "frozen-encoder", "--prepare-data",
                              "--cache-vision-features", "--group-by-image")
    assert losses == flagged and len(losses) == 3


def test_auto_losses_equal_the_plain_paths(tiny_dir, docvqa_dir, tmp_path):
    line, config, auto = _finetune(tiny_dir, docvqa_dir, tmp_path / "auto")  # --mode full: the store only
    assert line.startswith("speed auto: decode-once store;") and "no feature cache: --mode full" in line
    off_line, off_config, plain = _finetune(tiny_dir, docvqa_dir, tmp_path / "off", "--speed", "off")
    assert off_line.startswith("speed off: plain per-batch path (--speed off)")
    assert (off_config["prepare_data"], off_config["cache_vision_features"], off_config["group_by_image"]) == (
        False, False, False)
    assert not (tmp_path / "off" / "prepared").exists()
    assert auto == plain and len(auto) == 3  # bit for bit
    # frozen encoder without grouping: the cached features are fp16-rounded, the order is the plain one
    _, _, cached = _finetune(tiny_dir, docvqa_dir, tmp_path / "cached", "--mode", "frozen-encoder",
                             "--no-group-by-image")
    _, _, frozen_plain = _finetune(tiny_dir, docvqa_dir, tmp_path / "fplain", "--mode", "frozen-encoder",
                                   "--speed", "off")
    print(f"cached vs plain losses: worst relative difference "
          f"{max(abs(c / p - 1) for c, p in zip(cached, frozen_plain, strict=True)):.3g}")
    # float16 features (<= 2**-11 of each) against features ~100% wrong moving the loss ~1e-3: see test_feature_cache
    assert cached == pytest.approx(frozen_plain, rel=1e-5)


def test_streaming_and_a_full_disk_keep_the_plain_path(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    import florence_kit.train.speed as speed

    line, config, _ = _finetune(tiny_dir, docvqa_dir, tmp_path / "stream", "--mode", "frozen-encoder",
                                "--streaming", "--max-samples", "8")
    assert line.startswith("speed auto: plain per-batch path; the data is streamed")
    assert config["prepare_data"] is False
    monkeypatch.setattr(speed, "free_bytes", lambda _path: 1000)
    line, config, _ = _finetune(tiny_dir, docvqa_dir, tmp_path / "full", "--mode", "frozen-encoder")
    assert line.startswith("speed auto: plain per-batch path; no room for the decode-once store")
    assert not (tmp_path / "full" / "prepared").exists() and not (tmp_path / "full" / "vision_cache").exists()


def test_a_resumed_command_keeps_the_runs_choice(tiny_dir, docvqa_dir, tmp_path, monkeypatch):
    import florence_kit.train.speed as speed

    out = tmp_path / "run"
    _finetune(tiny_dir, docvqa_dir, out, "--mode", "frozen-encoder", "--save-every", "2")
    monkeypatch.setattr(speed, "free_bytes", lambda _path: 0)  # a re-decision would now pick the plain path
    line, config, _ = _finetune(tiny_dir, docvqa_dir, out, "--mode", "frozen-encoder", "--resume", "latest",
                                "--max-steps", "4")
    assert line.startswith("speed auto: resuming, so as the run chose: decode-once store + vision-feature cache "
                           "+ page grouping (not re-decided)")
    assert config["group_by_image"] is True

"""The ONNX runner's thread choice, the benchmark's machine description, the export's calibration pages and the
channels-last DaViT forms (no export here: these are fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")


def test_threads_follow_the_cores_this_process_may_use(monkeypatch) -> None:
    """One intra-op thread per usable physical core: an affinity mask of one CPU gives one thread; an explicit
    count wins."""
    import os

    from florence_kit.model import onnx_runtime

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0})
    assert onnx_runtime.usable_cores() == (1, 1)
    assert onnx_runtime.session_threads() == 1 and onnx_runtime.session_threads(3) == 3


def test_benchmark_describes_the_machine_beside_its_figures(capsys) -> None:
    """The CPU model, the cores used and the ISA extensions /proc/cpuinfo lists (AVX2, AVX-512, VNNI, AMX)."""
    from benchmarks.onnx_speed import describe, machine

    info = machine()
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags")
                 for f in line.split(":", 1)[1].split()}
    assert ("AVX-512" in info["isa"]) == ("avx512f" in flags) and ("AMX" in info["isa"]) == ("amx_int8" in flags)
    line = describe(info)
    assert info["cpu"] in line and f"{info['physical_cores']} cores" in line
    assert all(name in line for name in info["isa"])


def test_calibration_pages_come_from_the_runs_training_split(tiny_dir: Path, docvqa_dir: Path,
                                                              tmp_path: Path) -> None:
    """A run folder: pixel_values of distinct training pages of its own dataset; a bare checkpoint: synthetic pages
    of the processor's size."""
    import shutil

    import yaml
    from transformers import AutoProcessor

    from florence_kit.present.onnx_export import calibration_pages

    processor = AutoProcessor.from_pretrained(tiny_dir)
    run = tmp_path / "run"
    shutil.copytree(tiny_dir, run)
    (run / "config.yaml").write_text(yaml.safe_dump({"task": "docvqa", "dataset": str(docvqa_dir)}))
    pixels, origin = calibration_pages(str(run), processor, count=3)
    assert len(pixels) == 3 and "training pages" in origin and str(docvqa_dir) in origin
    assert pixels[0].shape == (1, 3, 128, 128) and not (pixels[0] == pixels[1]).all()
    pixels, origin = calibration_pages(str(tiny_dir), processor, count=2)
    assert origin == "synthetic pages" and len(pixels) == 2 and pixels[0].shape == (1, 3, 128, 128)


def test_channels_last_vision_tower_computes_what_transformers_computes() -> None:
    """The export-time DaViT (channels-last between convolutions, windows split by one transpose, a padded last
    window) equals transformers' forward, and the model's own forwards are back after."""
    from transformers import Florence2VisionConfig
    from transformers.models.florence2.modeling_florence2 import Florence2VisionBackbone

    from florence_kit.present.onnx_friendly import export_friendly

    torch.manual_seed(0)
    config = Florence2VisionConfig(embed_dim=[32, 64], num_heads=[2, 4], num_groups=[2, 4], depths=[1, 2],
                                   patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                                   patch_prenorm=[False, True], window_size=3)
    tower = Florence2VisionBackbone(config).eval()
    pixels = torch.randn(2, 3, 40, 40)  # 10x10 then 5x5 tokens: windows of 3 need padding at both stages
    with torch.no_grad():
        before = tower(pixels).last_hidden_state
        with export_friendly(tower):
            during = tower(pixels).last_hidden_state
        after = tower(pixels).last_hidden_state
    assert during.shape == before.shape
    assert torch.allclose(during, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before)

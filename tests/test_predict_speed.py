"""The predict benchmark with ONNX exports: the fp32 export answers as PyTorch (asserted inside), every side's rate
and ratio come from the same interleaved rounds."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_speed_benchmark_with_onnx_exports_reports_every_side(tmp_path, one_thread):
    pytest.importorskip("onnxruntime")
    from benchmarks import predict_speed

    out = tmp_path / "speed.json"
    predict_speed.main(["--n", "4", "--batch-size", "2", "--num-workers", "0", "--max-new-tokens", "4",
                        "--rounds", "2", "--onnx", "--json", str(out)])
    row = json.loads(out.read_text())
    assert row["rounds"] == 2 and all(len(v) == 2 for v in row["seconds"].values())
    assert set(row["seconds"]) == {"card", "predict", "onnx_fp32", "onnx_int8"}
    assert row["onnx_fp32_same_answers"] == row["predict_same_answers"] == 4
    assert 0 <= row["onnx_int8_same_answers"] <= 4
    for side in ("predict", "onnx_fp32", "onnx_int8"):
        # the median of two rounds is their mean: 4 images in half the two rounds' seconds
        assert row[f"{side}_images_per_s"] == pytest.approx(8 / sum(row["seconds"][side]))
    assert row["onnx_int8_ratio"] == pytest.approx(row["onnx_int8_images_per_s"] / row["card_images_per_s"])
